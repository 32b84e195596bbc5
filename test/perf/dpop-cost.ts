// What the DPoP check costs per request: the full secured path with a Bearer token and with a
// DPoP token + fresh proof, alternating rounds in one run on the same gateway, plus the two
// parts in isolation (proof verification, replay-store round trip). Not part of `npm test`.
//   npm run build && DATABASE_URL=postgres://… node dist/test/perf/dpop-cost.js
//   PERF_SECONDS (5) per round, PERF_ROUNDS (3), PERF_CONNECTIONS (50), PERF_PROOFS (20000)
import { createHash, createPrivateKey, generateKeyPairSync, randomBytes, sign, verify } from 'node:crypto'
import type { KeyObject } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { createServer } from 'node:http'
import { cpus, loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads'
import postgres from 'postgres'
import { Pool } from 'undici'

interface LoadJob {
  readonly role: 'load'
  readonly origin: string
  readonly path: string
  readonly htu: string
  readonly token: string
  readonly dpopKeyPem: string | undefined
  readonly jwk: Record<string, string> | undefined
  readonly connections: number
  readonly seconds: number
  readonly tls: { ca: string, cert: string, key: string }
}
// Signed ahead of each DPoP round; a round that uses them all stops early and says so.
const proofCount = Number(process.env['PERF_PROOFS'] ?? 20_000)
interface LoadResult { readonly requests: number, readonly errors: number, readonly seconds: number, readonly latenciesMs: number[], readonly ranOut: boolean }

const b64 = (value: unknown): string => Buffer.from(JSON.stringify(value)).toString('base64url')
const sha256 = (text: string): string => createHash('sha256').update(text).digest('base64url')

function makeProof (key: KeyObject, jwk: Record<string, string>, claims: Record<string, unknown>): string {
  const input = `${b64({ typ: 'dpop+jwt', alg: 'ES256', jwk })}.${b64(claims)}`
  return `${input}.${sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' }).toString('base64url')}`
}

async function loadWorker (job: LoadJob): Promise<LoadResult> {
  // Proofs are signed before the clock starts, so the client's signing is not measured.
  const proofs: string[] = []
  if (job.dpopKeyPem !== undefined && job.jwk !== undefined) {
    const key = createPrivateKey(job.dpopKeyPem)
    const iat = Math.floor(Date.now() / 1000)
    const ath = sha256(job.token)
    for (let i = 0; i < proofCount; i++) proofs.push(makeProof(key, job.jwk, { jti: randomBytes(16).toString('base64url'), htm: 'GET', htu: job.htu, iat, ath }))
  }
  const scheme = proofs.length > 0 ? 'DPoP' : 'Bearer'
  const pool = new Pool(job.origin, { connections: job.connections, pipelining: 1, connect: { ...job.tls, servername: 'localhost' } })
  const latencies: number[] = []
  let errors = 0
  let next = 0
  let ranOut = false
  const started = performance.now()
  const until = started + job.seconds * 1000
  async function loop (): Promise<void> {
    while (performance.now() < until) {
      const headers: Record<string, string> = { authorization: `${scheme} ${job.token}` }
      if (proofs.length > 0) {
        const proof = proofs[next++]
        if (proof === undefined) { ranOut = true; return }
        headers['dpop'] = proof
      }
      const t0 = performance.now()
      try {
        const res = await pool.request({ method: 'GET', path: job.path, headers })
        await res.body.dump()
        if (res.statusCode !== 200) errors++
        else latencies.push(performance.now() - t0)
      } catch {
        errors++
      }
    }
  }
  await Promise.all(Array.from({ length: job.connections }, loop))
  const seconds = (performance.now() - started) / 1000
  await pool.close()
  return { requests: latencies.length, errors, seconds, latenciesMs: latencies, ranOut }
}

async function upstreamWorker (): Promise<void> {
  const body = Buffer.from(JSON.stringify({ resourceType: 'Patient', id: 'perf-0001', name: [{ family: 'Perf', given: ['Dee'] }] }))
  const server = createServer((_req, res) => { res.writeHead(200, { 'content-type': 'application/fhir+json', 'content-length': body.length }); res.end(body) })
  await new Promise<void>(resolve => { server.listen(0, '127.0.0.1', resolve) })
  parentPort?.postMessage({ port: (server.address() as { port: number }).port })
  parentPort?.once('message', () => { server.close() })
}

function percentile (sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] ?? NaN
}

async function main (): Promise<void> {
  const { buildGateway } = await import('../../gateway/app.js')
  const { checkProof } = await import('../../gateway/dpop.js')
  const { createUpstreamPool } = await import('../../gateway/upstream.js')
  const { migrate } = await import('../../shared/db/migrations.js')
  const { perfGateway } = await import('./setup.js')
  const { replayRepository } = await import('../../shared/db/replay.js')
  const { postgresClient } = await import('../../shared/db/client.js')

  const seconds = Number(process.env['PERF_SECONDS'] ?? 5)
  const rounds = Number(process.env['PERF_ROUNDS'] ?? 3)
  const connections = Number(process.env['PERF_CONNECTIONS'] ?? 50)
  const adminUrl = process.env['DATABASE_URL']
  if (adminUrl === undefined) throw new Error('set DATABASE_URL (an admin connection; a scratch database is created and dropped)')
  const work = await mkdtemp(join(tmpdir(), 'ehrgw-dpop-perf-'))
  const dbName = `ehrgw_perf_${randomBytes(4).toString('hex')}`
  const admin = postgres(adminUrl, { max: 1, onnotice: () => {} })
  await admin.unsafe(`create database ${dbName}`)
  const dbUrl = new URL(adminUrl)
  dbUrl.pathname = `/${dbName}`
  const sql = postgresClient(dbUrl.toString(), { max: 10, onnotice: () => {}, transform: postgres.camel })
  const upstream = new Worker(new URL(import.meta.url), { workerData: { role: 'upstream' } })
  try {
    const { port: upstreamPort } = await new Promise<{ port: number }>(resolve => { upstream.once('message', resolve) })
    await migrate(sql)
    const { config, tls } = await perfGateway(sql, work, dbUrl.toString(), upstreamPort)
    const pool = createUpstreamPool(config)
    const app = await buildGateway(config, { sql, upstream: pool, logStream: new Writable({ write (_c, _e, done) { done() } }) })
    await app.listen({ host: '127.0.0.1', port: 0 })
    const origin = `https://localhost:${(app.server.address() as { port: number }).port}`
    const path = '/fhir/Patient/perf-0001'
    const htu = `${config.gateway.publicUrl}${path}`

    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' })
    const full = publicKey.export({ format: 'jwk' }) as Record<string, string>
    const jwk = { kty: 'EC', crv: 'P-256', x: full['x'] ?? '', y: full['y'] ?? '' }
    const tokenPool = new Pool(origin, { connect: { ...tls, servername: 'localhost' } })
    const fetchToken = async (proof?: string): Promise<string> => {
      const res = await tokenPool.request({ method: 'POST', path: '/v1/token', headers: proof === undefined ? {} : { dpop: proof } })
      return ((await res.body.json()) as { access_token: string }).access_token
    }
    const bearer = await fetchToken()
    const dpop = await fetchToken(makeProof(privateKey, jwk, { jti: randomBytes(16).toString('base64url'), htm: 'POST', htu: `${config.gateway.publicUrl}/v1/token`, iat: Math.floor(Date.now() / 1000) }))
    await tokenPool.close()

    // The parts on their own, in this thread: proof verification and the replay insert.
    const n = 3000
    const iat = Math.floor(Date.now() / 1000)
    const samples = Array.from({ length: n }, () => makeProof(privateKey, jwk, { jti: randomBytes(16).toString('base64url'), htm: 'GET', htu, iat, ath: sha256(dpop) }))
    let t0 = performance.now()
    for (const proof of samples) checkProof(proof, { method: 'GET', url: htu, nowSeconds: Date.now() / 1000, maxAgeSeconds: 60, accessToken: dpop })
    const verifyUs = (performance.now() - t0) * 1000 / n
    // The floor: OpenSSL's ECDSA verification alone, on the same proofs.
    t0 = performance.now()
    for (const proof of samples) {
      const dot = proof.lastIndexOf('.')
      verify('sha256', Buffer.from(proof.slice(0, dot)), { key: publicKey, dsaEncoding: 'ieee-p1363' }, Buffer.from(proof.slice(dot + 1), 'base64url'))
    }
    const rawUs = (performance.now() - t0) * 1000 / n
    const repo = replayRepository(sql)
    const rtts: number[] = []
    for (let i = 0; i < 1000; i++) {
      t0 = performance.now()
      await repo.consumeBatch([{ id: `perf:${i}:${randomBytes(8).toString('hex')}`, expiresAt: new Date(Date.now() + 60_000) }])
      rtts.push(performance.now() - t0)
    }
    rtts.sort((a, b) => a - b)

    const run = async (mode: 'bearer' | 'dpop', secs: number): Promise<LoadResult> => {
      const job: LoadJob = {
        role: 'load', origin, path, htu, token: mode === 'dpop' ? dpop : bearer,
        dpopKeyPem: mode === 'dpop' ? privateKey.export({ format: 'pem', type: 'pkcs8' }).toString() : undefined,
        jwk: mode === 'dpop' ? jwk : undefined,
        connections, seconds: secs, tls
      }
      const w = new Worker(new URL(import.meta.url), { workerData: job })
      const result = await new Promise<LoadResult>((resolve, reject) => { w.once('message', resolve); w.once('error', reject) })
      await w.terminate()
      return result
    }
    console.log(`# load average before the run: ${loadavg().map(l => l.toFixed(1)).join(' ')}`)
    console.log(`# DPoP cost: ${cpus().length} cores (${cpus()[0]?.model ?? '?'}), Node ${process.version}, ${connections} connections, ${rounds} rounds × ${seconds}s per mode, alternating`)
    await run('bearer', 2)
    await run('dpop', 2)
    const results: Record<'bearer' | 'dpop', LoadResult[]> = { bearer: [], dpop: [] }
    for (let r = 0; r < rounds; r++) {
      for (const mode of ['bearer', 'dpop'] as const) {
        const result = await run(mode, seconds)
        results[mode].push(result)
        console.log(`# round ${r + 1} ${mode}: ${(result.requests / result.seconds).toFixed(0)} req/s, ${result.errors} errors${result.ranOut ? ' (ran out of pre-signed proofs)' : ''}`)
      }
    }
    const summary = (['bearer', 'dpop'] as const).map(mode => {
      const byRate = [...results[mode]].sort((a, b) => a.requests / a.seconds - b.requests / b.seconds)
      const median = byRate[Math.floor(byRate.length / 2)] as LoadResult
      const sorted = [...median.latenciesMs].sort((a, b) => a - b)
      return { mode, rps: median.requests / median.seconds, p50: percentile(sorted, 0.5), p99: percentile(sorted, 0.99), errors: results[mode].reduce((s, r) => s + r.errors, 0) }
    })
    const [b, d] = summary as [typeof summary[number], typeof summary[number]]
    console.log('\n| path | req/s (median round) | p50 ms | p99 ms | errors |')
    console.log('| --- | ---: | ---: | ---: | ---: |')
    for (const s of summary) console.log(`| ${s.mode === 'bearer' ? 'mTLS + registry + Bearer + proxy' : 'mTLS + registry + DPoP token + proof + replay store + proxy'} | ${s.rps.toFixed(0)} | ${s.p50.toFixed(2)} | ${s.p99.toFixed(2)} | ${s.errors} |`)
    console.log(`\nadded by DPoP: p50 ${(d.p50 - b.p50).toFixed(2)} ms, p99 ${(d.p99 - b.p99).toFixed(2)} ms, throughput ${((d.rps / b.rps - 1) * 100).toFixed(1)}%`)
    console.log(`parts: checkProof (ES256, node:crypto) ${verifyUs.toFixed(1)} µs/proof (crypto.verify alone: ${rawUs.toFixed(1)} µs); replay insert round trip p50 ${percentile(rtts, 0.5).toFixed(3)} ms, p99 ${percentile(rtts, 0.99).toFixed(3)} ms`)
    console.log(`# load average after the run: ${loadavg().map(l => l.toFixed(1)).join(' ')}`)
    await app.close()
    await pool.close()
  } finally {
    upstream.postMessage('stop')
    await upstream.terminate()
    await sql.end({ timeout: 1 })
    await admin.unsafe(`drop database if exists ${dbName} with (force)`)
    await admin.end({ timeout: 1 })
    await rm(work, { recursive: true, force: true })
  }
}

if (isMainThread) {
  await main()
} else if ((workerData as { role: string }).role === 'upstream') {
  await upstreamWorker()
} else {
  parentPort?.postMessage(await loadWorker(workerData as LoadJob))
}
