// Ad-hoc measurement of the audit trail (not part of `npm test` or `npm run bench`):
//   1. rows/s the batch writer puts into a local Postgres;
//   2. the gateway's full secured path with its audit trail vs the same app built with a
//      sink that discards rows, alternating rounds in one run.
// npm run build && DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres node --expose-gc dist/test/perf/audit.js
//   PERF_ROWS (200000), PERF_SECONDS (5), PERF_ROUNDS (3), PERF_CONNECTIONS (20)
import { randomBytes, randomUUID } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { Worker } from 'node:worker_threads'
import postgres from 'postgres'
import { request, Agent } from 'undici'
import { AuditTrail } from '../../gateway/audit.js'
import type { AuditSink } from '../../gateway/audit.js'
import { buildGateway } from '../../gateway/app.js'
import { createMetrics } from '../../gateway/metrics.js'
import { createUpstreamPool } from '../../gateway/upstream.js'
import { auditRepository } from '../../shared/db/audit.js'
import type { AuditRecord } from '../../shared/db/audit.js'
import { postgresClient } from '../../shared/db/client.js'
import { migrate } from '../../shared/db/migrations.js'
import type { LoadJob, LoadResult } from '../bench/load-worker.js'
import { perfGateway } from './setup.js'

const env = process.env
const ROWS = Number(env['PERF_ROWS'] ?? 200_000)
const SECONDS = Number(env['PERF_SECONDS'] ?? 5)
const ROUNDS = Number(env['PERF_ROUNDS'] ?? 3)
const CONNECTIONS = Number(env['PERF_CONNECTIONS'] ?? 20)
const adminUrl = env['DATABASE_URL'] ?? 'postgres://postgres@127.0.0.1:5432/postgres'

function worker<T> (file: string, data?: unknown): { worker: Worker, first: Promise<T> } {
  const w = new Worker(new URL(file, import.meta.url), { workerData: data })
  return { worker: w, first: new Promise<T>((resolve, reject) => { w.once('message', resolve); w.once('error', reject) }) }
}
const pct = (sorted: number[], p: number): number => sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] ?? NaN

const dbName = `ehrgw_perf_${randomBytes(4).toString('hex')}`
const admin = postgres(adminUrl, { max: 1, onnotice: () => {} })
await admin.unsafe(`create database ${dbName}`)
const dbUrl = new URL(adminUrl)
dbUrl.pathname = `/${dbName}`
const sql = postgresClient(dbUrl.toString(), { max: 10, onnotice: () => {}, transform: postgres.camel, fetch_types: false })
const work = await mkdtemp(join(tmpdir(), 'ehrgw-perf-'))
const { worker: upstreamWorker, first: upstreamReady } = worker<{ port: number }>('../bench/upstream-worker.js')
try {
  await migrate(sql)
  console.log(`# audit perf: ${cpus().length} cores (${cpus()[0]?.model ?? '?'}), Node ${process.version}; shared machine, figures are noisy`)

  // 1. Writer throughput: rows recorded as fast as the loop can, timed until all are in.
  const row = (): AuditRecord => ({
    at: new Date(), requestId: randomUUID(), machineId: randomUUID(), machineName: 'ws-perf-01',
    certThumbprint: 'q'.repeat(43), tokenJti: randomUUID(), clientIp: '10.1.2.3', method: 'GET',
    route: '/fhir/*', path: '/fhir/Patient/12345', resourceType: 'Patient', resourceId: '12345',
    queryParams: ['_count', 'name'], status: 200, errorCode: null, durationMs: 1.234, upstreamMs: 0.987,
    bytesIn: 0, bytesOut: 1650
  })
  const log = { info () {}, warn () {}, error (o: unknown) { console.error(o) } }
  for (const batchSize of [100, 500, 2000]) {
    const trail = new AuditTrail(auditRepository(sql).insertBatch, { bufferMax: ROWS * 2, batchSize, flushIntervalMs: 200, closeTimeoutMs: 60_000, log, metrics: createMetrics() })
    trail.start()
    const gc = (globalThis as { gc?: () => void }).gc
    gc?.()
    const heapBefore = process.memoryUsage().heapUsed
    const started = performance.now()
    for (let i = 0; i < ROWS; i++) trail.record(row())
    const recordMs = performance.now() - started
    const heapAfter = process.memoryUsage().heapUsed
    while (trail.depth > 0) await new Promise(resolve => setTimeout(resolve, 5))
    const secs = (performance.now() - started) / 1000
    await trail.close()
    console.log(`writer, batch ${batchSize}: ${ROWS} rows in ${secs.toFixed(2)} s = ${Math.round(ROWS / secs)} rows/s (building + record() ${(recordMs * 1000 / ROWS).toFixed(2)} µs/row; heap ~${Math.round((heapAfter - heapBefore) / ROWS)} B per buffered row${gc === undefined ? ', run with --expose-gc for a cleaner figure' : ''})`)
  }
  await sql.unsafe('alter table audit_log disable trigger audit_log_no_truncate')
  await sql`truncate audit_log`
  await sql.unsafe('alter table audit_log enable trigger audit_log_no_truncate')

  // 2. Latency with audit on vs off, same process, same database, alternating rounds.
  const { port: upstreamPort } = await upstreamReady
  const { config, tls } = await perfGateway(sql, work, dbUrl.toString(), upstreamPort)
  const discard = new Writable({ write (_c, _e, done) { done() } })
  const discardingSink: AuditSink = { admit: () => true, record () {}, full: false }

  async function round (audit: boolean): Promise<LoadResult> {
    const pool = createUpstreamPool(config)
    const app = await buildGateway(config, { sql, upstream: pool, logStream: discard, ...(audit ? {} : { audit: discardingSink }) })
    await app.listen({ host: '127.0.0.1', port: 0 })
    const origin = `https://localhost:${(app.server.address() as { port: number }).port}`
    const agent = new Agent({ connect: { ...tls, servername: 'localhost' } })
    const tokenRes = await request(`${origin}/v1/token`, { method: 'POST', dispatcher: agent })
    const { access_token: token } = await tokenRes.body.json() as { access_token: string }
    await agent.close()
    const job: LoadJob = { origin, path: '/fhir/Patient/bench-0001', headers: { authorization: `Bearer ${token}` }, connections: CONNECTIONS, seconds: SECONDS, tls }
    const { worker: w, first } = worker<LoadResult>('../bench/load-worker.js', job)
    const result = await first
    await w.terminate()
    await app.close()
    await pool.close()
    return result
  }
  const results: Record<'on' | 'off', LoadResult[]> = { on: [], off: [] }
  for (let r = 0; r < ROUNDS; r++) {
    for (const mode of (r % 2 === 0 ? ['off', 'on'] : ['on', 'off']) as Array<'on' | 'off'>) results[mode].push(await round(mode === 'on'))
  }
  const [{ n }] = await sql<Array<{ n: number }>>`select count(*)::int as n from audit_log` as unknown as [{ n: number }]
  for (const mode of ['off', 'on'] as const) {
    const all = results[mode].flatMap(x => x.latenciesMs).sort((a, b) => a - b)
    const rps = results[mode].map(x => x.requests / x.seconds).sort((a, b) => a - b)
    const errors = results[mode].reduce((s, x) => s + x.errors, 0)
    console.log(`gateway, audit ${mode.padEnd(3)}: median ${Math.round(rps[Math.floor(rps.length / 2)] ?? 0)} req/s (rounds ${rps.map(Math.round).join(', ')}), p50 ${pct(all, 0.5).toFixed(2)} ms, p99 ${pct(all, 0.99).toFixed(2)} ms, errors ${errors}`)
  }
  const served = results.on.reduce((s, x) => s + x.requests + x.errors, 0) + ROUNDS // + token requests
  console.log(`audit rows written in the "on" rounds: ${n} (requests answered incl. tokens: ${served})`)
} finally {
  await upstreamWorker.terminate()
  await sql.end({ timeout: 5 })
  await admin.unsafe(`drop database if exists ${dbName} with (force)`)
  await admin.end({ timeout: 1 })
  await rm(work, { recursive: true, force: true })
}
