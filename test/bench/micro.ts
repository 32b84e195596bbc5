// Micro-benchmarks of the hot path's parts, in process. The parts other features bring
// (DPoP proof check, replay store, audit queue) are found by importing their built module and
// checking for the export the bench knows how to drive; a build without them says so.
import { randomUUID } from 'node:crypto'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import type { Sql } from 'postgres'
import { loadConfig } from '../../shared/config.js'
import type { Machine } from '../../shared/db/machines.js'
import { machinesRepository } from '../../shared/db/machines.js'

const budgetMs = Number(process.env['BENCH_MICRO_MS'] ?? 1000)

// Runs fn for about budgetMs (after a short warm-up) and prints its cost per op; fn may do
// opsPerCall ops, so that parts costing nanoseconds are not drowned by the await around each call.
async function time (name: string, fn: (i: number) => unknown, opsPerCall = 1): Promise<void> {
  const warm = performance.now() + Math.min(200, budgetMs / 5)
  let i = 0
  while (performance.now() < warm) await fn(i++)
  let n = 0
  const t0 = performance.now()
  const until = t0 + budgetMs
  while (performance.now() < until) {
    for (let k = 0; k < 100; k++) await fn(i + n++)
  }
  const us = (performance.now() - t0) * 1000 / (n * opsPerCall)
  console.log(`| ${name} | ${us < 1 ? us.toFixed(3) : us < 10 ? us.toFixed(2) : us.toFixed(1)} | ${Math.round(1e6 / us).toLocaleString('en')} |`)
}

type Module = Record<string, unknown>
async function built (dist: string, path: string): Promise<Module | undefined> {
  const file = join(dist, path)
  return existsSync(file) ? await import(pathToFileURL(file).href) as Module : undefined
}

export async function runMicro (sql: Sql, dist: string, kek: string): Promise<void> {
  console.log(`micro-benchmarks (${budgetMs} ms each, in process):\n`)
  console.log('| part | µs / op | ops/s |')
  console.log('| --- | ---: | ---: |')
  const skipped: string[] = []
  const failed = (what: string, err: unknown): string => `${what}: its API changed (${err instanceof Error ? err.message : String(err)}); update test/bench/micro.ts`
  const config = loadConfig({ NODE_ENV: 'test', TOKEN_KEY_ENCRYPTION_KEY: kek, TOKEN_ISSUER: 'https://localhost', TOKEN_TTL_SECONDS: '3600' })
  const machine = (await machinesRepository(sql).list())[0] as Machine

  // Token verification: the first sight of a token (signature) and every later one (cache).
  const tokensModule = await built(dist, 'gateway/tokens.js')
  const keysModule = await built(dist, 'gateway/signing-keys.js')
  const SigningKeys = keysModule?.['SigningKeys'] as (new (sql: Sql, o: unknown) => { start: () => Promise<void>, close: () => Promise<void> }) | undefined
  const TokenService = tokensModule?.['TokenService'] as (new (k: unknown, c: unknown, n: () => number) => { issue: (...a: unknown[]) => Promise<{ token: string }>, verify: (t: string) => Promise<unknown> }) | undefined
  if (SigningKeys !== undefined && TokenService !== undefined) {
    const keys = new SigningKeys(sql, { kek: Buffer.from(kek, 'base64'), tokens: (config as unknown as Record<string, unknown>)['tokens'], now: Date.now, onReloadError: () => {} })
    await keys.start()
    try {
      const tokens = new TokenService(keys, (config as unknown as Record<string, unknown>)['tokens'], Date.now)
      const fresh: string[] = []
      for (let i = 0; i < 3000; i++) fresh.push((await tokens.issue(machine, machine.fingerprint, '127.0.0.1')).token)
      await time('token issue (sign)', async () => await tokens.issue(machine, machine.fingerprint, '127.0.0.1'))
      let next = 0
      await time('token verify, cold (signature check)', async () => {
        if (next >= fresh.length) fresh.push((await tokens.issue(machine, machine.fingerprint, '127.0.0.1')).token)
        await tokens.verify(fresh[next++] as string)
      })
      const hot = fresh[0] as string
      await time('token verify, cached claims', async () => await tokens.verify(hot))
    } catch (err) {
      skipped.push(`token service: its API changed (${err instanceof Error ? err.message : String(err)}); update test/bench/micro.ts`)
    } finally {
      await keys.close()
    }
  } else {
    skipped.push('token service: not found in this build')
  }

  // Loosely typed on purpose: other features change these signatures, and a bench that no
  // longer compiles would break `npm run build` (and with it `npm test`) for everyone.
  const registryModule = await built(dist, 'gateway/registry.js')
  const MachineRegistry = registryModule?.['MachineRegistry'] as (new (sql: Sql, o: unknown) => { lookup: (fingerprint: string) => Promise<unknown> }) | undefined
  try {
    if (MachineRegistry === undefined) throw new Error('no MachineRegistry export')
    const registry = new MachineRegistry(sql, { ttlMs: 60_000, now: Date.now })
    await registry.lookup(machine.fingerprint)
    await time('registry lookup (cache hit)', async () => await registry.lookup(machine.fingerprint))
  } catch (err) {
    skipped.push(`registry lookup: ${err instanceof Error ? err.message : String(err)}; update test/bench/micro.ts`)
  }

  type HeaderFn = (...args: unknown[]) => unknown
  const upstream = (await built(dist, 'gateway/upstream.js') ?? {}) as Record<string, HeaderFn>
  const incoming = {
    host: 'gateway.example:8443', 'user-agent': 'Mozilla/5.0 (X11; Linux x86_64) Frontend/1.0', accept: 'application/fhir+json',
    'accept-encoding': 'gzip, deflate, br', 'accept-language': 'en', authorization: `Bearer ${'x'.repeat(600)}`, connection: 'keep-alive', 'x-forwarded-for': '10.0.0.1'
  }
  const answered = { 'content-type': 'application/fhir+json', 'content-length': '1517', etag: 'W/"1"', 'last-modified': 'Thu, 01 Jan 2026 00:00:00 GMT', server: 'HAPI', date: 'Thu, 01 Jan 2026 00:00:00 GMT', connection: 'keep-alive', 'keep-alive': 'timeout=5' }
  const rewrite = { upstreamBase: 'http://ehr.internal/fhir', upstreamBasePath: '/fhir', proxyPrefix: '/fhir' }
  // The third argument was the API key and becomes the credential headers with the upstream
  // token sources; timing either shape is the same work.
  const credentials = { 'x-api-key': 'k'.repeat(32) }
  for (const [name, run] of [
    ['upstream request headers', () => upstream['upstreamRequestHeaders']?.(incoming, 'x-api-key', credentials, randomUUID())],
    ['client response headers', () => upstream['clientResponseHeaders']?.(answered, rewrite, () => false)],
    ['upstream path check', () => upstream['upstreamPath']?.('/fhir/Patient/bench-0001?_format=json', '/fhir', '/fhir')]
  ] as const) {
    try {
      await time(name, run)
    } catch (err) {
      skipped.push(failed(name, err))
    }
  }

  // Brought by the DPoP work (issue 3): proof verification (RFC 9449 §4.3 without the
  // replay step) and the replay store's consume (one Postgres round trip).
  const dpop = await built(dist, 'gateway/dpop.js')
  const checkProof = dpop?.['checkProof'] as ((value: string, ctx: Record<string, unknown>) => unknown) | undefined
  if (checkProof !== undefined) {
    try {
      const { DpopSigner } = await import('./dpop.js')
      const signer = new DpopSigner()
      const url = 'https://localhost/fhir/Patient/bench-0001'
      const token = 'x'.repeat(600)
      let proof = signer.proof('GET', url, token)
      let minted = Date.now()
      await time('DPoP proof check (ES256 verify, claims, ath)', () => {
        // a proof stays fresh for the check's max age; re-mint one now and then
        if (Date.now() - minted > 20_000) { proof = signer.proof('GET', url, token); minted = Date.now() }
        return checkProof(proof, { method: 'GET', url, nowSeconds: Math.floor(Date.now() / 1000), maxAgeSeconds: 60, accessToken: token })
      })
    } catch (err) {
      skipped.push(failed('DPoP proof check', err))
    }
  } else {
    skipped.push(dpop === undefined ? 'DPoP proof check: not available in this build (no gateway/dpop.js)' : `DPoP proof check: gateway/dpop.js has no checkProof (${Object.keys(dpop).join(', ')})`)
  }
  const replay = await built(dist, 'gateway/replay.js')
  const ReplayStore = replay?.['ReplayStore'] as (new (sql: Sql, o: unknown) => { consume: (id: string, expiresAtMs: number) => Promise<boolean>, close: () => unknown }) | undefined
  if (ReplayStore !== undefined) {
    try {
      const store = new ReplayStore(sql, { now: Date.now, onCleanupError: () => {} })
      await time('replay-store consume (one Postgres insert)', async () => await store.consume(`bench:${randomUUID()}`, Date.now() + 60_000))
      // As under load: many requests waiting on the store at once, which a store that
      // batches answers with few statements (per consume: µs of wall time, consumes/s).
      const concurrent = 50
      await time(`replay-store consume, ${concurrent} concurrent (batched)`, async () => {
        await Promise.all(Array.from({ length: concurrent }, async () => await store.consume(`bench:${randomUUID()}`, Date.now() + 60_000)))
      }, concurrent)
      store.close()
    } catch (err) {
      skipped.push(failed('replay-store consume', err))
    }
  } else {
    skipped.push('replay-store consume: not available in this build (no gateway/replay.js)')
  }

  // Brought by the audit work: the per-request enqueue (the write itself is batched off the
  // request path; here it goes nowhere, so only the enqueue is timed).
  const audit = await built(dist, 'gateway/audit.js')
  const AuditTrail = audit?.['AuditTrail'] as (new (write: (rows: readonly unknown[]) => Promise<unknown>, o: unknown) => { admit: () => boolean, record: (row: unknown) => void, close: () => Promise<void> }) | undefined
  if (AuditTrail !== undefined) {
    try {
      const { createMetrics } = await import('../../gateway/metrics.js')
      const quiet = { info: () => {}, warn: () => {}, error: () => {} }
      const trail = new AuditTrail(async () => {}, { bufferMax: 1_000_000, batchSize: 1000, flushIntervalMs: 50, closeTimeoutMs: 1000, log: quiet, metrics: createMetrics() })
      const row = {
        at: new Date(), requestId: randomUUID(), machineId: machine.id, machineName: machine.name, certThumbprint: machine.fingerprint, tokenJti: randomUUID(),
        clientIp: '127.0.0.1', method: 'GET', route: '/fhir/*', path: '/fhir/Patient/bench-0001', resourceType: 'Patient', resourceId: 'bench-0001',
        queryParams: [], status: 200, errorCode: null, durationMs: 1.2, upstreamMs: 0.8, bytesIn: 0, bytesOut: 1488
      }
      await time('audit enqueue (admit + record)', () => { if (trail.admit()) trail.record(row) })
      await trail.close()
    } catch (err) {
      skipped.push(failed('audit enqueue', err))
    }
  } else {
    skipped.push('audit enqueue: not available in this build (no gateway/audit.js)')
  }
  // What every request adds to the metrics (gateway/app.ts onResponse, routes/proxy.ts):
  // one requests counter and two histograms, over a handful of label sets as under load.
  try {
    const { createMetrics } = await import('../../gateway/metrics.js')
    const metrics = createMetrics()
    const statuses = [200, 200, 200, 200, 200, 200, 404, 401]
    const perCall = 1000
    await time('metrics per request (counter + 2 histograms)', i => {
      for (let k = 0; k < perCall; k++) {
        const status = statuses[(i + k) & 7] as number
        metrics.requests.labels('/fhir/*', 'GET', String(status), '').inc()
        metrics.duration.labels('/fhir/*').observe(((k & 63) + 1) / 20_000)
        metrics.upstreamDuration.labels(String(status)).observe(((k & 63) + 1) / 25_000)
      }
    }, perCall)
  } catch (err) {
    skipped.push(failed('metrics per request', err))
  }
  for (const line of skipped) console.log(`| ${line} | | |`)
}
