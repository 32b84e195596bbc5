// The one load generator for every target, in its own thread: undici with the machine's
// client certificate over a fixed number of keep-alive connections, latencies into an HDR
// histogram (µs). Closed loop (each connection sends its next request when the previous
// answer is read) or fixed rate (requests scheduled at 1/rate intervals; latency runs from
// the intended send time, so a stall counts against every request it delayed instead of
// being hidden by coordinated omission).
import { parentPort, workerData } from 'node:worker_threads'
import * as hdr from 'hdr-histogram-js'
import { Pool } from 'undici'
import { DpopSigner } from './dpop.js'

// get: a fixed request; dpop: a fresh proof per request for one DPoP-bound token;
// single-use: a fresh token for every call (the pair is one sample); token: issuance only.
export type LoadKind = 'get' | 'dpop' | 'single-use' | 'token'

export interface LoadJob {
  readonly origin: string
  readonly path: string
  readonly kind?: LoadKind // 'get' when absent
  readonly headers: Record<string, string>
  readonly connections: number
  readonly seconds: number
  // requests per second for a fixed-rate run; closed loop when absent
  readonly rate?: number
  readonly tls?: { ca: string, cert: string, key: string }
  // the origin DPoP proofs name in htu (RFC 9449 §4.2), when not `origin`
  readonly htuBase?: string
}

export interface LoadResult {
  readonly requests: number
  readonly errors: number
  readonly seconds: number
  readonly histogram: string // hdr-histogram-js compressed base64, µs
  readonly firstError?: string
  // every latency in ms, for in-process harnesses that compute their own percentiles
  readonly latenciesMs: number[]
}

const job = workerData as LoadJob
const pool = new Pool(job.origin, {
  connections: job.connections,
  pipelining: 1,
  ...(job.tls === undefined ? {} : { connect: { ...job.tls, servername: 'localhost' } })
})
const histogram = hdr.build({ lowestDiscernibleValue: 1, highestTrackableValue: 120_000_000, numberOfSignificantValueDigits: 3 })
const htuBase = job.htuBase ?? job.origin
const signer = job.kind === 'dpop' || job.kind === 'single-use' ? new DpopSigner() : undefined
let firstError: string | undefined
const latencies: number[] = []
let errors = 0
let requests = 0

async function call (method: 'GET' | 'POST', path: string, headers: Record<string, string>): Promise<{ status: number, body: string }> {
  const res = await pool.request({ method, path, headers })
  if (res.statusCode === 200 && method === 'GET') {
    await res.body.dump()
    return { status: 200, body: '' }
  }
  return { status: res.statusCode, body: await res.body.text() }
}

async function fetchToken (dpop: boolean): Promise<string> {
  const headers: Record<string, string> = dpop && signer !== undefined ? { dpop: signer.proof('POST', `${htuBase}/v1/token`) } : {}
  const res = await call('POST', '/v1/token', headers)
  if (res.status !== 200) throw new Error(`POST /v1/token: ${res.status} ${res.body.slice(0, 300)}`)
  return (JSON.parse(res.body) as { access_token: string }).access_token
}

const dpopToken = job.kind === 'dpop' ? await fetchToken(true) : undefined
// A workstation signs its proofs on its own CPU, not the gateway's: signing them here in the
// timed window would charge the gateway row for the client's ES256 signatures on the shared
// cores. So the proofs are signed before the clock starts (each used once, iat still within
// DPOP_MAX_AGE_SECONDS); past the stock, proofs are signed as they are needed.
const proofs: string[] = []
if (signer !== undefined && dpopToken !== undefined) {
  const stock = Math.min(job.rate === undefined ? 5000 * job.seconds : job.rate * job.seconds, 200_000)
  for (let i = 0; i < stock; i++) proofs.push(signer.proof('GET', htuBase + job.path, dpopToken))
}

// One sample: true when it succeeded.
async function once (): Promise<void> {
  let res
  if (job.kind === 'token') {
    res = await call('POST', '/v1/token', job.headers)
  } else if (job.kind === 'single-use') {
    const token = await fetchToken(false)
    res = await call('GET', job.path, { ...job.headers, authorization: `Bearer ${token}` })
  } else if (job.kind === 'dpop' && signer !== undefined && dpopToken !== undefined) {
    res = await call('GET', job.path, { ...job.headers, authorization: `DPoP ${dpopToken}`, dpop: proofs.pop() ?? signer.proof('GET', htuBase + job.path, dpopToken) })
  } else {
    res = await call('GET', job.path, job.headers)
  }
  if (res.status !== 200) throw new Error(`${res.status} ${res.body.slice(0, 300)}`)
}

async function sample (t0: number): Promise<void> {
  try {
    await once()
    requests++
    const elapsed = performance.now() - t0
    histogram.recordValue(Math.max(1, Math.round(elapsed * 1000)))
    latencies.push(elapsed)
  } catch (err) {
    errors++
    firstError ??= err instanceof Error ? err.message : String(err)
  }
}

// Every connection is opened (TLS handshake, client certificate checked) before the clock
// starts: the figures are the steady state of a kept-alive pool. Otherwise a fixed-rate run's
// first requests queue behind 50 handshakes, and that burst alone sets its p99.
await Promise.all(Array.from({ length: job.connections }, async () => { await once().catch(() => {}) }))

const started = performance.now()
const until = started + job.seconds * 1000
if (job.rate === undefined) {
  await Promise.all(Array.from({ length: job.connections }, async () => {
    while (performance.now() < until) await sample(performance.now())
  }))
} else {
  const interval = 1000 / job.rate
  const inflight = new Set<Promise<void>>()
  for (let i = 0; ; i++) {
    const intended = started + i * interval
    if (intended >= until) break
    const wait = intended - performance.now()
    // Yield even when behind, or the answers that would catch us up are never read.
    await new Promise(resolve => wait > 0 ? setTimeout(resolve, wait) : setImmediate(resolve))
    const p = sample(intended).finally(() => inflight.delete(p))
    inflight.add(p)
  }
  await Promise.all(inflight)
}
const seconds = (performance.now() - started) / 1000
await pool.close()
const result: LoadResult = { requests, errors, seconds, histogram: hdr.encodeIntoCompressedBase64(histogram), latenciesMs: latencies, ...(firstError === undefined ? {} : { firstError }) }
parentPort?.postMessage(result)
