// `npm run bench`: the full secured path against a plain mTLS proxy and the upstream alone,
// measured side by side in one run on the same data. Never part of `npm test`.
//   BENCH_SECONDS (default 5) per round, BENCH_ROUNDS (3), BENCH_CONNECTIONS (50),
//   BENCH_LOG_LEVEL (info), BENCH_TARGETS (direct,plain,gateway: a subset, e.g. to profile one)
import { randomBytes, X509Certificate } from 'node:crypto'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { Worker } from 'node:worker_threads'
import Fastify from 'fastify'
import postgres from 'postgres'
import { Pool } from 'undici'
import { buildGateway } from '../../gateway/app.js'
import { createDevCa, writeKeyPair } from '../../gateway/demo/pki.js'
import { createUpstreamPool } from '../../gateway/upstream.js'
import { describeCertificate } from '../../shared/certificates.js'
import { loadGatewayConfig } from '../../shared/config.js'
import { startEmbeddedPostgres } from '../../shared/db/embedded.js'
import { machineRecord, machinesRepository } from '../../shared/db/machines.js'
import { migrate } from '../../shared/db/migrations.js'
import type { LoadJob, LoadResult } from './load-worker.js'

const seconds = Number(process.env['BENCH_SECONDS'] ?? 5)
const rounds = Number(process.env['BENCH_ROUNDS'] ?? 3)
const connections = Number(process.env['BENCH_CONNECTIONS'] ?? 50)

function worker<T> (file: string, data?: unknown): { worker: Worker, first: Promise<T> } {
  const w = new Worker(new URL(file, import.meta.url), { workerData: data })
  return { worker: w, first: new Promise<T>((resolve, reject) => { w.once('message', resolve); w.once('error', reject) }) }
}

async function load (job: LoadJob): Promise<LoadResult> {
  const { worker: w, first } = worker<LoadResult>('./load-worker.js', job)
  const result = await first
  await w.terminate()
  return result
}

function percentile (sorted: number[], p: number): number {
  return sorted.length === 0 ? NaN : sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] as number
}

const work = await mkdtemp(join(tmpdir(), 'ehrgw-bench-'))
let adminUrl = process.env['DATABASE_URL']
const embedded = adminUrl === undefined ? await startEmbeddedPostgres({ dir: join(work, 'pg'), database: 'postgres' }) : undefined
adminUrl ??= embedded?.url as string
const dbName = `ehrgw_bench_${randomBytes(4).toString('hex')}`
const admin = postgres(adminUrl, { max: 1, onnotice: () => {} })
await admin.unsafe(`create database ${dbName}`)
const dbUrl = new URL(adminUrl)
dbUrl.pathname = `/${dbName}`
const sql = postgres(dbUrl.toString(), { max: 10, onnotice: () => {}, transform: postgres.camel })

const { worker: upstreamWorker, first: upstreamReady } = worker<{ port: number, bytes: number }>('./upstream-worker.js')
const { port: upstreamPort, bytes } = await upstreamReady
const upstreamOrigin = `http://127.0.0.1:${upstreamPort}`

try {
  await migrate(sql)
  const ca = await createDevCa()
  const pkiDir = join(work, 'pki')
  await mkdir(pkiDir)
  const server = await writeKeyPair(pkiDir, 'server', await ca.issueServer({ commonName: 'localhost' }))
  const caFile = join(pkiDir, 'ca.crt')
  await writeFile(caFile, ca.cert)
  const client = await ca.issueClient({ commonName: 'ws-bench-01' })
  await machinesRepository(sql).add(machineRecord('ws-bench-01', describeCertificate(new X509Certificate(client.cert)), null))
  const config = loadGatewayConfig({
    NODE_ENV: 'production',
    DATABASE_URL: dbUrl.toString(),
    TLS_CERT_FILE: server.certFile,
    TLS_KEY_FILE: server.keyFile,
    TLS_CLIENT_CA_FILE: caFile,
    EHR_UPSTREAM_URL: `${upstreamOrigin}/fhir`,
    EHR_API_KEY: randomBytes(16).toString('hex'),
    TOKEN_KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
    TOKEN_ISSUER: 'https://localhost',
    TOKEN_TTL_SECONDS: '3600',
    RATE_LIMIT_MAX: '100000000',
    // Production's default level: every request logs its start and end.
    LOG_LEVEL: process.env['BENCH_LOG_LEVEL'] ?? 'info'
  })
  const tls = { ca: ca.cert, cert: client.cert, key: client.key }
  const discard = new Writable({ write (_chunk, _enc, done) { done() } })

  // The baseline a user would otherwise run: Fastify over the same mutual TLS, proxying
  // through an undici pool, with no registry, token or rate limit.
  async function startPlainProxy (): Promise<{ origin: string, close: () => Promise<void> }> {
    const pool = new Pool(upstreamOrigin, { connections: config.upstream.connections })
    const app = Fastify({ https: { cert: await readFile(server.certFile), key: await readFile(server.keyFile), ca: ca.cert, requestCert: true, rejectUnauthorized: true } })
    app.get('/fhir/*', async (request, reply) => {
      const res = await pool.request({ method: 'GET', path: request.url })
      return await reply.code(res.statusCode).headers(res.headers).send(res.body)
    })
    await app.listen({ host: '127.0.0.1', port: 0 })
    const port = (app.server.address() as { port: number }).port
    let handshakes = 0
    app.server.on('secureConnection', () => { handshakes++ })
    return { origin: `https://localhost:${port}`, close: async () => { console.log(`#   plain proxy: ${handshakes} TLS handshakes`); await app.close(); await pool.close() } }
  }

  async function startGatewayTarget (): Promise<{ origin: string, close: () => Promise<void>, token: string }> {
    const pool = createUpstreamPool(config)
    const app = await buildGateway(config, { sql, upstream: pool, logStream: discard })
    await app.listen({ host: '127.0.0.1', port: 0 })
    const port = (app.server.address() as { port: number }).port
    const origin = `https://localhost:${port}`
    let handshakes = 0
    app.server.on('secureConnection', () => { handshakes++ })
    const agentPool = new Pool(origin, { connect: { ...tls, servername: 'localhost' } })
    const res = await agentPool.request({ method: 'POST', path: '/v1/token' })
    const { access_token: token } = await res.body.json() as { access_token: string }
    await agentPool.close()
    return { origin, token, close: async () => { console.log(`#   gateway: ${handshakes} TLS handshakes`); await app.close(); await pool.close() } }
  }

  interface Row { name: string, results: LoadResult[] }
  const rows: Row[] = [{ name: 'upstream direct', results: [] }, { name: 'plain mTLS proxy (no auth)', results: [] }, { name: 'gateway: mTLS + registry + Bearer + proxy', results: [] }]

  async function measure (index: number, secs: number): Promise<LoadResult> {
    if (index === 0) return await load({ origin: upstreamOrigin, path: '/fhir/Patient/bench-0001', headers: {}, connections, seconds: secs })
    if (index === 1) {
      const target = await startPlainProxy()
      try {
        return await load({ origin: target.origin, path: '/fhir/Patient/bench-0001', headers: {}, connections, seconds: secs, tls })
      } finally { await target.close() }
    }
    const target = await startGatewayTarget()
    try {
      return await load({ origin: target.origin, path: '/fhir/Patient/bench-0001', headers: { authorization: `Bearer ${target.token}` }, connections, seconds: secs, tls })
    } finally { await target.close() }
  }

  const targets = (process.env['BENCH_TARGETS'] ?? 'direct,plain,gateway').split(',')
  const selected = ['direct', 'plain', 'gateway'].map(name => targets.includes(name))
  console.log(`# ehr-gateway bench: ${cpus().length} cores (${cpus()[0]?.model ?? '?'}), Node ${process.version}, ${connections} connections, ${bytes} B responses, ${rounds} rounds × ${seconds}s`)
  for (let i = 0; i < rows.length; i++) if (selected[i] === true) await measure(i, 2) // warm-up
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < rows.length; i++) {
      if (selected[i] !== true) continue
      const result = await measure(i, seconds)
      rows[i]?.results.push(result)
      process.stdout.write(`# round ${r + 1} ${rows[i]?.name}: ${(result.requests / result.seconds).toFixed(0)} req/s, ${result.errors} errors\n`)
    }
  }

  const summary = rows.filter(row => row.results.length > 0).map(row => {
    const byRate = [...row.results].sort((a, b) => a.requests / a.seconds - b.requests / b.seconds)
    const median = byRate[Math.floor(byRate.length / 2)] as LoadResult
    const sorted = [...median.latenciesMs].sort((a, b) => a - b)
    return { name: row.name, rps: median.requests / median.seconds, p50: percentile(sorted, 0.5), p99: percentile(sorted, 0.99), errors: row.results.reduce((n, r) => n + r.errors, 0) }
  })
  const rate = (name: string): number => summary.find(s => s.name === name)?.rps ?? NaN
  const direct = rate(rows[0]?.name ?? '')
  const baseline = rate(rows[1]?.name ?? '')
  console.log('\n| target | req/s (median) | p50 ms | p99 ms | errors | × plain proxy | × direct |')
  console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: |')
  for (const s of summary) {
    console.log(`| ${s.name} | ${s.rps.toFixed(0)} | ${s.p50.toFixed(2)} | ${s.p99.toFixed(2)} | ${s.errors} | ${(s.rps / baseline).toFixed(2)} | ${(s.rps / direct).toFixed(2)} |`)
  }
  const gatewayRatio = rate(rows[2]?.name ?? '') / baseline
  console.log(`\ntarget (issue 6): secured path ≥ 1.0× plain proxy — ${gatewayRatio >= 1 ? 'met' : 'not met'} (${gatewayRatio.toFixed(2)}×)`)
  const resultsDir = new URL('./results/', import.meta.url).pathname.replace('/dist/test/', '/test/')
  await mkdir(resultsDir, { recursive: true })
  await writeFile(join(resultsDir, `bench-${new Date().toISOString().replaceAll(':', '-')}.json`), JSON.stringify({ date: new Date().toISOString(), node: process.version, cores: cpus().length, connections, seconds, rounds, summary }, null, 2))
} finally {
  upstreamWorker.postMessage('stop')
  await upstreamWorker.terminate()
  await sql.end({ timeout: 1 })
  await admin.unsafe(`drop database if exists ${dbName} with (force)`)
  await admin.end({ timeout: 1 })
  await embedded?.stop()
  await rm(work, { recursive: true, force: true })
}
