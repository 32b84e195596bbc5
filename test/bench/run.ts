// `npm run bench`: the gateway in its configurations against what a user would run instead
// (the upstream alone, @fastify/http-proxy over mTLS, nginx mTLS), side by side in one run on
// the same data, each server its own process. Never part of `npm test`.
//   npm run bench                 table + extras + micro-benchmarks (a few minutes)
//   npm run bench -- --micro      micro-benchmarks only
//   npm run bench -- --soak       RSS soak of the Bearer gateway (BENCH_SOAK_SECONDS, 600)
// Env: BENCH_SECONDS (5) per round, BENCH_ROUNDS (3), BENCH_WARMUP_SECONDS (2),
//   BENCH_CONNECTIONS (50), BENCH_ROWS (comma list of row ids, default all),
//   BENCH_FIXED_RATE (1000), BENCH_FIXED_SECONDS (10) and BENCH_FIXED_ROUNDS (3), BENCH_REVOCATIONS (20),
//   BENCH_NGINX_WORKERS (1), BENCH_SOAK_RATE (500), BENCH_CPU_PROF (dir: the Bearer gateway
//   runs under `node --cpu-prof` and writes its profile there), BENCH_REF_DIST (another build's
//   dist/ as an extra Bearer row, for A/B under the same noise), BENCH_VARIANTS (`id:NAME=v,NAME=v;…`:
//   extra Bearer rows with more gateway environment; name their ids in BENCH_ROWS too),
//   BENCH_RATE (the table at a fixed rate: compares CPU s / 1k req), DATABASE_URL (else embedded).
import { randomBytes, X509Certificate } from 'node:crypto'
import { existsSync, readFileSync } from 'node:fs'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { cpus, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Worker } from 'node:worker_threads'
import * as hdr from 'hdr-histogram-js'
import postgres from 'postgres'
import { Pool } from 'undici'
import { describeCertificate } from '../../shared/certificates.js'
import { postgresClient } from '../../shared/db/client.js'
import { startEmbeddedPostgres } from '../../shared/db/embedded.js'
import { machineRecord, machinesRepository } from '../../shared/db/machines.js'
import { migrate } from '../../shared/db/migrations.js'
import { perfGatewayEnv, perfPki } from '../perf/setup.js'
import { DpopSigner } from './dpop.js'
import type { LoadJob, LoadKind, LoadResult } from './load-worker.js'
import { runMicro } from './micro.js'
import { cpuSeconds, firstJsonLine, freePort, machineTicks, postgresCpuSeconds, rssBytes, start } from './procs.js'
import type { Proc } from './procs.js'

const num = (name: string, fallback: number): number => Number(process.env[name] ?? fallback)
const seconds = num('BENCH_SECONDS', 5)
const rounds = Math.max(1, num('BENCH_ROUNDS', 3))
const warmup = num('BENCH_WARMUP_SECONDS', 2)
const connections = num('BENCH_CONNECTIONS', 50)
const fixedRate = num('BENCH_FIXED_RATE', 1000)
const fixedSeconds = num('BENCH_FIXED_SECONDS', 10)
const fixedRounds = Math.max(1, num('BENCH_FIXED_ROUNDS', 3))
const revocations = num('BENCH_REVOCATIONS', 20)
const cpuProf = process.env['BENCH_CPU_PROF']
// BENCH_RATE: the table's rounds at this fixed rate instead of closed loop; every row then
// does the same work, so CPU s / 1k req compares the rows without a saturated machine's noise.
const tableRate = process.env['BENCH_RATE'] === undefined ? undefined : Number(process.env['BENCH_RATE'])
const variants = (process.env['BENCH_VARIANTS'] ?? '').split(';').filter(v => v.trim() !== '').map(v => {
  const [id = '', settings = ''] = v.split(':')
  return { id: id.trim(), env: Object.fromEntries(settings.split(',').filter(kv => kv.includes('=')).map(kv => [kv.slice(0, kv.indexOf('=')).trim(), kv.slice(kv.indexOf('=') + 1).trim()])) }
})
const args = new Set(process.argv.slice(2))
const mode = args.has('--soak') ? 'soak' : args.has('--micro') ? 'micro' : 'table'

const dist = fileURLToPath(new URL('../../', import.meta.url)) // dist/
const resultsDir = fileURLToPath(new URL('./results/', import.meta.url)).replace('/dist/test/', '/test/')
const PATH = '/fhir/Patient/bench-0001'
// The gateway runs as `npm start` runs it: with the node flags of package.json's start script.
const startScript = (JSON.parse(readFileSync(join(dist, '..', 'package.json'), 'utf8')) as { scripts: { start: string } }).scripts.start
const startFlags = startScript.split(/\s+/).filter(arg => arg.startsWith('--'))

async function load (job: LoadJob): Promise<LoadResult> {
  const w = new Worker(new URL('./load-worker.js', import.meta.url), { workerData: job })
  const result = await new Promise<LoadResult>((resolve, reject) => { w.once('message', resolve); w.once('error', reject) })
  await w.terminate()
  return result
}

const ms = (h: hdr.Histogram, p: number): number => h.getValueAtPercentile(p) / 1000
const sleep = async (msecs: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, msecs)) }

// ---------------------------------------------------------------- setup
const work = await mkdtemp(join(tmpdir(), 'ehrgw-bench-'))
const procs: Proc[] = []
let adminUrl = process.env['DATABASE_URL']
// Its own temp dir, as the embedded test does: run as root, Postgres runs as another user
// that must reach its directory, and `work` (keys inside) stays 0700.
const pgDir = adminUrl === undefined ? await mkdtemp(join(tmpdir(), 'ehrgw-bench-pg-')) : undefined
const embedded = pgDir === undefined ? undefined : await startEmbeddedPostgres({ dir: pgDir, database: 'postgres' }).catch(async (err: unknown) => {
  await rm(work, { recursive: true, force: true })
  await rm(pgDir, { recursive: true, force: true })
  throw err
})
adminUrl ??= embedded?.url as string
const dbName = `ehrgw_bench_${randomBytes(4).toString('hex')}`
const admin = postgres(adminUrl, { max: 1, onnotice: () => {} })
await admin.unsafe(`create database ${dbName}`)
const dbUrl = new URL(adminUrl)
dbUrl.pathname = `/${dbName}`
const sql = postgresClient(dbUrl.toString(), { max: 4, onnotice: () => {}, transform: postgres.camel })

try {
  await migrate(sql)
  const pkiDir = join(work, 'pki')
  await mkdir(pkiDir)
  const pki = await perfPki(sql, pkiDir, 'ws-bench-01')
  const { ca, server, caFile, tls } = pki
  const repo = machinesRepository(sql)

  const upstream = start(process.execPath, [join(dist, 'test/bench/upstream.js')], { PATH: process.env['PATH'] })
  procs.push(upstream)
  const { port: upstreamPort, bytes } = await firstJsonLine<{ port: number, bytes: number }>(upstream)
  const upstreamOrigin = `http://127.0.0.1:${upstreamPort}`

  const gatewayBaseEnv = { PATH: process.env['PATH'] ?? '', ...perfGatewayEnv(pki, dbUrl.toString(), upstreamOrigin) }

  // A started target, or the reason it cannot run in this build / on this machine.
  interface Target { readonly origin: string, readonly pid: number, readonly tls: boolean, readonly note?: string }
  type Started = Target | { readonly skipped: string }

  async function startGateway (env: Record<string, string>, options: { cpuProf?: string, dist?: string } = {}): Promise<Started> {
    const port = await freePort()
    const opsPort = await freePort()
    const cwd = await mkdtemp(join(work, 'gw-')) // no developer .env is read
    const nodeArgs = [...startFlags, ...(options.cpuProf === undefined ? [] : ['--cpu-prof', `--cpu-prof-dir=${options.cpuProf}`])]
    const proc = start(process.execPath, [...nodeArgs, join(options.dist ?? dist, 'gateway/server.js')], {
      ...gatewayBaseEnv, GATEWAY_HOST: '127.0.0.1', GATEWAY_PORT: String(port), OPS_HOST: '127.0.0.1', OPS_PORT: String(opsPort), ...env
    }, { cwd, stdout: 'ignore' })
    procs.push(proc)
    for (let i = 0; i < 300; i++) {
      if (proc.child.exitCode !== null) {
        const err = proc.stderr()
        if (/not supported by this release|CONFIG_INVALID/.test(err)) return { skipped: `not available in this build (${err.trim().split('\n').find(l => /not supported/.test(l))?.trim() ?? err.trim().slice(0, 200)})` }
        throw new Error(`gateway exited: ${err}`)
      }
      try {
        const res = await fetch(`http://127.0.0.1:${opsPort}/readyz`)
        if (res.status === 200) return { origin: `https://127.0.0.1:${port}`, pid: proc.pid, tls: true }
      } catch {}
      await sleep(100)
    }
    throw new Error(`gateway did not become ready: ${proc.stderr()}`)
  }

  async function request (origin: string, method: 'GET' | 'POST', path: string, headers: Record<string, string>): Promise<{ status: number, body: string }> {
    const pool = new Pool(origin, { connect: { ...tls, servername: 'localhost' } })
    try {
      const res = await pool.request({ method, path, headers })
      return { status: res.statusCode, body: await res.body.text() }
    } finally { await pool.close() }
  }

  // Each row names what it needs from the build; the probe says whether it is there.
  const dpopHtuBase = new Map<string, string>()
  const probes = {
    // The proof's htu is tried as the URL we connect to, then under TOKEN_ISSUER's origin (a
    // gateway may judge htu against its configured public URL rather than the Host header).
    async dpop (target: Target): Promise<string | undefined> {
      const signer = new DpopSigner()
      let answer = ''
      for (const base of [target.origin, new URL(gatewayBaseEnv.TOKEN_ISSUER).origin]) {
        const res = await request(target.origin, 'POST', '/v1/token', { dpop: signer.proof('POST', `${base}/v1/token`) })
        const type = res.status === 200 ? (JSON.parse(res.body) as { token_type?: string }).token_type : undefined
        if (type === 'DPoP') { dpopHtuBase.set(target.origin, base); return undefined }
        answer = `${res.status} token_type ${String(type)} ${res.status === 200 ? '' : res.body.slice(0, 160)}`
      }
      return `not available in this build (POST /v1/token with a DPoP proof answered ${answer.trim()})`
    },
    async singleUse (target: Target): Promise<string | undefined> {
      const res = await request(target.origin, 'POST', '/v1/token', {})
      const token = (JSON.parse(res.body) as { access_token: string }).access_token
      const first = await request(target.origin, 'GET', PATH, { authorization: `Bearer ${token}` })
      const second = await request(target.origin, 'GET', PATH, { authorization: `Bearer ${token}` })
      return first.status === 200 && (second.status === 401 || second.status === 403) ? undefined : `not available in this build (a token's second use answered ${second.status})`
    }
  }

  async function startPlainProxy (): Promise<Started> {
    // The same node flags as the gateway: the ratio then measures the code, not the tuning.
    const nodeArgs = [...startFlags, ...(cpuProf === undefined ? [] : ['--cpu-prof', `--cpu-prof-dir=${cpuProf}`, '--cpu-prof-name=fastify-proxy.cpuprofile'])]
    const proc = start(process.execPath, [...nodeArgs, join(dist, 'test/bench/plain-proxy.js')], {
      PATH: process.env['PATH'], BENCH_CERT: server.certFile, BENCH_KEY: server.keyFile, BENCH_CA: caFile, BENCH_UPSTREAM: upstreamOrigin
    })
    procs.push(proc)
    const { port } = await firstJsonLine<{ port: number }>(proc)
    return { origin: `https://127.0.0.1:${port}`, pid: proc.pid, tls: true }
  }

  function nginxBinary (): string | undefined {
    for (const dir of (process.env['PATH'] ?? '').split(':').concat(['/usr/sbin', '/usr/local/sbin'])) {
      if (dir !== '' && existsSync(join(dir, 'nginx'))) return join(dir, 'nginx')
    }
    return undefined
  }

  // nginx as a user would put it in front of the EHR: mutual TLS verified against the same
  // CA, an upstream keep-alive pool, access log on (buffered). Everything under a temp prefix.
  async function startNginx (): Promise<Started> {
    const bin = nginxBinary()
    if (bin === undefined) return { skipped: 'skipped: no nginx binary on PATH (Debian: apt-get install nginx)' }
    const dir = await mkdtemp(join(work, 'nginx-'))
    const port = await freePort()
    const workers = process.env['BENCH_NGINX_WORKERS'] ?? '1'
    await writeFile(join(dir, 'nginx.conf'), `
worker_processes ${workers};
daemon off;
master_process on;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 4096; }
http {
  access_log ${dir}/access.log combined buffer=64k flush=1s;
  client_body_temp_path ${dir}/client_body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  upstream ehr {
    server 127.0.0.1:${upstreamPort};
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:${port} ssl;
    ssl_certificate ${server.certFile};
    ssl_certificate_key ${server.keyFile};
    ssl_client_certificate ${caFile};
    ssl_verify_client on;
    keepalive_requests 1000000;
    location /fhir/ {
      proxy_pass http://ehr;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
`)
    const proc = start(bin, ['-p', dir, '-c', join(dir, 'nginx.conf'), '-e', join(dir, 'error.log')], { PATH: process.env['PATH'] })
    procs.push(proc)
    const origin = `https://127.0.0.1:${port}`
    for (let i = 0; i < 100; i++) {
      if (proc.child.exitCode !== null) return { skipped: `skipped: nginx did not start (${proc.stderr().trim().slice(0, 200)} ${await readFile(join(dir, 'error.log'), 'utf8').catch(() => '')})` }
      try {
        if ((await request(origin, 'GET', PATH, {})).status === 200) return { origin, pid: proc.pid, tls: true, note: `nginx ${workers} worker(s)` }
      } catch {}
      await sleep(100)
    }
    return { skipped: `skipped: nginx never answered (${proc.stderr().slice(0, 200)})` }
  }

  // ---------------------------------------------------------------- rows
  const audited = existsSync(join(dist, 'gateway/audit.js'))
  interface RowSpec {
    readonly id: string
    readonly name: string
    readonly kind: LoadKind
    readonly start: () => Promise<Started>
    readonly probe?: (target: Target) => Promise<string | undefined>
  }
  const refDist = process.env['BENCH_REF_DIST']
  const specs: RowSpec[] = [
    { id: 'direct', name: 'upstream direct (HTTP, no proxy)', kind: 'get', start: async () => ({ origin: upstreamOrigin, pid: upstream.pid, tls: false }) },
    { id: 'fastify-proxy', name: '@fastify/http-proxy, mTLS, no auth (baseline)', kind: 'get', start: startPlainProxy },
    { id: 'nginx', name: 'nginx, mTLS (ssl_verify_client on), keepalive pool', kind: 'get', start: startNginx },
    {
      id: 'bearer',
      name: `gateway Bearer, 1 worker (mTLS + registry + token + proxy${audited ? ' + audit' : ''})`,
      kind: 'get',
      start: async () => await startGateway({ GATEWAY_WORKERS: '1' }, cpuProf === undefined ? {} : { cpuProf })
    },
    // BENCH_REF_DIST: another build's dist/ (e.g. main's) as an A/B row in the same run.
    // BENCH_VARIANTS: `id:NAME=value,NAME=value;id2:…` extra Bearer rows whose gateways get
    // more environment, to weigh one setting under the same noise.
    ...variants.map(v => ({ id: v.id, name: `gateway Bearer, ${v.id} (${Object.entries(v.env).map(([k, x]) => `${k}=${x}`).join(' ')})`, kind: 'get' as const, start: async () => await startGateway(v.env) })),
    ...(refDist === undefined ? [] : [{ id: 'bearer-ref', name: `gateway Bearer, reference build (${refDist})`, kind: 'get' as const, start: async () => await startGateway({}, { dist: refDist }) }]),
    { id: 'dpop', name: 'gateway DPoP (proof + replay check per request)', kind: 'dpop', start: async () => await startGateway({ TOKEN_REQUIRE_DPOP: 'true' }, cpuProf === undefined ? {} : { cpuProf }), probe: probes.dpop },
    ...(refDist === undefined ? [] : [{ id: 'dpop-ref', name: `gateway DPoP, reference build (${refDist})`, kind: 'dpop' as const, start: async () => await startGateway({ TOKEN_REQUIRE_DPOP: 'true' }, { dist: refDist }), probe: probes.dpop }]),
    { id: 'single-use', name: 'gateway single-use (token + call pairs)', kind: 'single-use', start: async () => await startGateway({ TOKEN_SINGLE_USE: 'true' }), probe: probes.singleUse },
    { id: 'workers-auto', name: 'gateway Bearer, GATEWAY_WORKERS=auto', kind: 'get', start: async () => await startGateway({ GATEWAY_WORKERS: 'auto' }) }
  ]
  const only = process.env['BENCH_ROWS']?.split(',')
  const header = `# ehr-gateway bench: ${cpus().length} cores (${cpus()[0]?.model ?? '?'}), ${(totalmem() / 2 ** 30).toFixed(1)} GiB, Node ${process.version}, ` +
    `${connections} connections, ${bytes} B responses, ${rounds} rounds × ${seconds}s after ${warmup}s warm-up; gateway: node ${startFlags.join(' ')}`
  const machine = { cores: cpus().length, cpu: cpus()[0]?.model ?? '?', memGiB: Math.round(totalmem() / 2 ** 30), node: process.version }

  if (mode === 'micro') {
    await runMicro(sql, dist, gatewayBaseEnv.TOKEN_KEY_ENCRYPTION_KEY)
  } else if (mode === 'soak') {
    await soak()
  } else {
    await table()
  }

  async function soak (): Promise<void> {
    const soakSeconds = num('BENCH_SOAK_SECONDS', 600)
    const rate = num('BENCH_SOAK_RATE', 500)
    const warm = Math.min(60, Math.max(5, soakSeconds / 10))
    const target = await startGateway({})
    if ('skipped' in target) throw new Error(target.skipped)
    const token = await bearerToken(target.origin)
    const startRss = rssBytes(target.pid)
    console.log(`# soak: gateway Bearer at ${rate} req/s fixed rate for ${soakSeconds}s (warm-up ${warm}s), RSS sampled every second`)
    const job = load({ origin: target.origin, path: PATH, kind: 'get', headers: { authorization: `Bearer ${token}` }, connections, seconds: soakSeconds, rate, tls })
    let done = false
    void job.finally(() => { done = true })
    const t0 = Date.now()
    let postWarm = 0
    let peak = startRss
    let last = startRss
    while (!done) {
      await sleep(1000)
      last = rssBytes(target.pid)
      peak = Math.max(peak, last)
      if (postWarm === 0 && Date.now() - t0 >= warm * 1000) postWarm = last
      if ((Date.now() - t0) % 60_000 < 1000) console.log(`#   ${Math.round((Date.now() - t0) / 1000)}s RSS ${(last / 2 ** 20).toFixed(1)} MiB`)
    }
    const result = await job
    const mib = (b: number): string => (b / 2 ** 20).toFixed(1)
    const holds = last <= postWarm * 1.1
    console.log(`\nRSS start ${mib(startRss)} MiB, after warm-up ${mib(postWarm)} MiB, peak ${mib(peak)} MiB, end ${mib(last)} MiB; ${result.requests} requests, ${result.errors} errors`)
    console.log(`target: soak RSS end within 10% of after-warm-up — ${holds ? 'met' : 'NOT met'} (${((last / postWarm - 1) * 100).toFixed(1)}%)`)
    await writeResults('soak', { mode: 'soak', seconds: soakSeconds, rate, rssMiB: { start: startRss / 2 ** 20, afterWarmup: postWarm / 2 ** 20, peak: peak / 2 ** 20, end: last / 2 ** 20 }, holds, requests: result.requests, errors: result.errors })
  }

  async function bearerToken (origin: string, tlsOptions = tls): Promise<string> {
    const pool = new Pool(origin, { connect: { ...tlsOptions, servername: 'localhost' } })
    try {
      const res = await pool.request({ method: 'POST', path: '/v1/token' })
      const body = await res.body.text()
      if (res.statusCode !== 200) throw new Error(`POST /v1/token answered ${res.statusCode}: ${body}`)
      return (JSON.parse(body) as { access_token: string }).access_token
    } finally { await pool.close() }
  }

  // What Postgres still does for the previous row (its last audit batch, the autovacuum its
  // inserts set off) would land in this row's round, in its throughput and its Postgres CPU:
  // wait, at most 10 s, until Postgres takes under one tick over a quarter of a second.
  async function postgresQuiet (): Promise<void> {
    const until = Date.now() + 10_000
    let last = postgresCpuSeconds()
    while (Date.now() < until) {
      await sleep(250)
      const now = postgresCpuSeconds()
      if (now - last < 0.005) return
      last = now
    }
  }

  async function table (): Promise<void> {
    console.log(header)
    // CPU seconds of the target's processes and of local Postgres, and the share of the
    // machine's ticks stolen by the hypervisor, over one round.
    type Measured = LoadResult & { cpu: number, dbCpu: number, steal: number }
    interface Row { readonly spec: RowSpec, readonly target?: Target, readonly skipped?: string, readonly headers: Record<string, string>, readonly results: Measured[] }
    const rows: Row[] = []
    for (const spec of specs) {
      if (only !== undefined && !only.includes(spec.id)) continue
      const started = await spec.start()
      if ('skipped' in started) { rows.push({ spec, skipped: started.skipped, headers: {}, results: [] }); continue }
      const unavailable = await spec.probe?.(started)
      if (unavailable !== undefined) { rows.push({ spec, skipped: unavailable, headers: {}, results: [] }); continue }
      const headers: Record<string, string> = spec.id === 'bearer' || spec.id === 'bearer-ref' || spec.id === 'workers-auto' || variants.some(v => v.id === spec.id) ? { authorization: `Bearer ${await bearerToken(started.origin)}` } : {}
      rows.push({ spec, target: started, headers, results: [] })
    }
    for (const row of rows) if (row.skipped !== undefined) console.log(`# ${row.spec.id}: ${row.skipped}`)
    const live = rows.filter(row => row.target !== undefined)
    const measure = async (row: Row, secs: number): Promise<Measured> => {
      const target = row.target as Target
      await postgresQuiet()
      const before = cpuSeconds(target.pid)
      const dbBefore = postgresCpuSeconds()
      const ticksBefore = machineTicks()
      const htuBase = dpopHtuBase.get(target.origin)
      const result = await load({ origin: target.origin, path: PATH, kind: row.spec.kind, headers: row.headers, connections, seconds: secs, ...(tableRate === undefined ? {} : { rate: tableRate }), ...(target.tls ? { tls } : {}), ...(htuBase === undefined ? {} : { htuBase }) })
      const ticks = machineTicks()
      return {
        ...result,
        cpu: cpuSeconds(target.pid) - before,
        dbCpu: postgresCpuSeconds() - dbBefore,
        steal: (ticks.steal - ticksBefore.steal) / Math.max(1, ticks.total - ticksBefore.total)
      }
    }
    for (const row of live) await measure(row, warmup)
    // Alternating rounds: a slow minute on the shared machine hits every row, not just one.
    for (let r = 0; r < rounds; r++) {
      for (const row of live) {
        const result = await measure(row, seconds)
        row.results.push(result)
        console.log(`# round ${r + 1} ${row.spec.id}: ${(result.requests / result.seconds).toFixed(0)} req/s, steal ${(result.steal * 100).toFixed(1)}%, ${result.errors} errors${result.firstError === undefined ? '' : ` (first: ${result.firstError.slice(0, 160)})`}`)
      }
    }

    const summary = live.map(row => {
      const byRate = [...row.results].sort((a, b) => a.requests / a.seconds - b.requests / b.seconds)
      const median = byRate[Math.floor(byRate.length / 2)] as Measured
      const h = hdr.decodeFromCompressedBase64(median.histogram)
      const medianOf = (f: (r: Measured) => number): number => row.results.map(f).sort((a, b) => a - b)[Math.floor(row.results.length / 2)] as number
      const cpuPer1k = medianOf(r => r.cpu / r.requests * 1000)
      const dbCpuPer1k = medianOf(r => r.dbCpu / r.requests * 1000)
      return {
        id: row.spec.id,
        name: row.spec.name,
        rps: median.requests / median.seconds,
        p50: ms(h, 50),
        p99: ms(h, 99),
        cpuPer1k,
        dbCpuPer1k,
        stealPct: medianOf(r => r.steal * 100),
        errors: row.results.reduce((n, r) => n + r.errors, 0),
        rounds: row.results.map(r => Math.round(r.requests / r.seconds)),
        ...(row.target?.note === undefined ? {} : { note: row.target.note })
      }
    })
    const rate = (id: string): number => summary.find(s => s.id === id)?.rps ?? NaN
    // A ratio compares two rows round by round, then takes the median: rounds alternate the
    // rows, so each pair ran seconds apart under the same conditions, and a round the
    // hypervisor slowed (see steal) counts once instead of skewing either row's median.
    const paired = (id: string, of: string): number => {
      const a = summary.find(s => s.id === id)?.rounds ?? []
      const b = summary.find(s => s.id === of)?.rounds ?? []
      const ratios = a.map((x, i) => x / (b[i] ?? NaN)).filter(r => Number.isFinite(r)).sort((x, y) => x - y)
      return ratios[Math.floor(ratios.length / 2)] ?? NaN
    }
    const ratio = (x: number): string => Number.isNaN(x) ? '–' : `${x.toFixed(2)}×`
    console.log('\n| row | req/s (median) | p50 ms | p99 ms | × @fastify/http-proxy | × nginx | CPU s / 1k req | + Postgres CPU s / 1k | steal % | errors |')
    console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    for (const s of summary) {
      console.log(`| ${s.name} | ${s.rps.toFixed(0)} | ${s.p50.toFixed(2)} | ${s.p99.toFixed(2)} | ${ratio(paired(s.id, 'fastify-proxy'))} | ${ratio(paired(s.id, 'nginx'))} | ${s.cpuPer1k.toFixed(3)} | ${s.dbCpuPer1k.toFixed(3)} | ${s.stealPct.toFixed(1)} | ${s.errors} |`)
    }
    for (const row of rows) if (row.skipped !== undefined) console.log(`| ${row.spec.name} | ${row.skipped} | | | | | | | | |`)
    if (rate('single-use') > 0) console.log('(single-use: one sample is a POST /v1/token + GET pair)')

    // Extras on the Bearer gateway.
    const bearer = live.find(row => row.spec.id === 'bearer')?.target
    const extras: Record<string, unknown> = {}
    // A profiling run (BENCH_CPU_PROF) profiles the table's load only.
    if (bearer !== undefined && cpuProf === undefined) {
      const issued = await load({ origin: bearer.origin, path: '/v1/token', kind: 'token', headers: {}, connections, seconds, tls })
      extras['tokensPerSecond'] = issued.requests / issued.seconds
      console.log(`\ntoken issuance (POST /v1/token, ${connections} connections): ${(issued.requests / issued.seconds).toFixed(0)} tokens/s, ${issued.errors} errors`)

      // Tail latency on a shared VM is set as much by the hypervisor as by us: each run keeps
      // its steal, and the targets alternate over BENCH_FIXED_ROUNDS rounds, the median p99
      // of each counting, so one stolen slice does not decide the comparison.
      interface FixedRun { readonly p50: number, readonly p99: number, readonly stealPct: number }
      const fixed = async (origin: string, headers: Record<string, string>, withTls: boolean): Promise<FixedRun> => {
        const before = machineTicks()
        const res = await load({ origin, path: PATH, kind: 'get', headers, connections, seconds: fixedSeconds, rate: fixedRate, ...(withTls ? { tls } : {}) })
        const after = machineTicks()
        const h = hdr.decodeFromCompressedBase64(res.histogram)
        return { p50: ms(h, 50), p99: ms(h, 99), stealPct: (after.steal - before.steal) / Math.max(1, after.total - before.total) * 100 }
      }
      const token = await bearerToken(bearer.origin)
      const plainTarget = live.find(row => row.spec.id === 'fastify-proxy')?.target
      // The plain proxy at the same rate tells what mutual TLS and a Node proxy cost by
      // themselves (the direct row has neither), so the gateway's own share is visible.
      const fixedTargets: Array<{ id: string, run: () => Promise<FixedRun> }> = [
        { id: 'direct', run: async () => await fixed(upstreamOrigin, {}, false) },
        { id: 'gateway', run: async () => await fixed(bearer.origin, { authorization: `Bearer ${token}` }, true) },
        ...(plainTarget === undefined ? [] : [{ id: 'plainProxy', run: async () => await fixed(plainTarget.origin, {}, true) }])
      ]
      await fixedTargets[1]?.run() // warm
      const fixedRuns = new Map<string, FixedRun[]>(fixedTargets.map(x => [x.id, []]))
      for (let r = 0; r < fixedRounds; r++) for (const x of fixedTargets) fixedRuns.get(x.id)?.push(await x.run())
      const medianRun = (id: string): FixedRun | undefined => {
        const runs = [...(fixedRuns.get(id) ?? [])].sort((a, b) => a.p99 - b.p99)
        return runs[Math.floor(runs.length / 2)]
      }
      const direct = medianRun('direct') as FixedRun
      const gw = medianRun('gateway') as FixedRun
      const plain = medianRun('plainProxy')
      const added = { p50: gw.p50 - direct.p50, p99: gw.p99 - direct.p99 }
      extras['fixedRate'] = {
        rate: fixedRate,
        seconds: fixedSeconds,
        rounds: fixedRounds,
        direct,
        gateway: gw,
        ...(plain === undefined ? {} : { plainProxy: plain, addedOverPlainProxy: { p50: gw.p50 - plain.p50, p99: gw.p99 - plain.p99 } }),
        added,
        runs: Object.fromEntries(fixedRuns)
      }
      const runsText = (id: string): string => (fixedRuns.get(id) ?? []).map(x => `${x.p99.toFixed(2)} (steal ${x.stealPct.toFixed(1)}%)`).join(', ')
      console.log(`fixed rate ${fixedRate} req/s, ${fixedRounds} alternating rounds of ${fixedSeconds}s (latency from intended send time; median round): direct p50 ${direct.p50.toFixed(2)} / p99 ${direct.p99.toFixed(2)} ms; gateway p50 ${gw.p50.toFixed(2)} / p99 ${gw.p99.toFixed(2)} ms; added p50 ${added.p50.toFixed(2)} / p99 ${added.p99.toFixed(2)} ms`)
      if (plain !== undefined) console.log(`  same rate through @fastify/http-proxy over mTLS: p50 ${plain.p50.toFixed(2)} / p99 ${plain.p99.toFixed(2)} ms; the gateway adds p50 ${(gw.p50 - plain.p50).toFixed(2)} / p99 ${(gw.p99 - plain.p99).toFixed(2)} ms over it`)
      for (const x of fixedTargets) console.log(`  p99 ms by round, ${x.id}: ${runsText(x.id)}`)

      extras['revocation'] = await revocation()
    }

    // Targets (issue 6).
    const targets: Array<{ target: string, figure: string, holds: boolean | null }> = []
    const add = (target: string, value: number, figure: string, holds: boolean): void => { targets.push(Number.isNaN(value) ? { target, figure: 'not measured in this run', holds: null } : { target, figure, holds }) }
    const b = paired('bearer', 'fastify-proxy')
    add('full secured path (Bearer) ≥ 1.0× @fastify/http-proxy', b, `${b.toFixed(2)}×`, b >= 1)
    const d = paired('dpop', 'fastify-proxy')
    add('DPoP ≥ 0.7× @fastify/http-proxy', d, `${d.toFixed(2)}×`, d >= 0.7)
    const n = paired('bearer', 'nginx')
    add('against nginx mTLS: aim ≥ 0.5×', n, `${n.toFixed(2)}×`, n >= 0.5)
    const f = (extras['fixedRate'] as { added: { p99: number } } | undefined)?.added.p99 ?? NaN
    add(`added latency at ${fixedRate} req/s over direct: p99 ≤ 2 ms`, f, `${f.toFixed(2)} ms`, f <= 2)
    const rv = (extras['revocation'] as { maxMs: number } | undefined)?.maxMs ?? NaN
    add('revocation on a second instance: max ≤ 1 s', rv, `${rv.toFixed(0)} ms`, rv <= 1000)
    targets.push({ target: 'soak RSS end within 10% of after-warm-up', figure: 'separate mode: npm run bench -- --soak', holds: null })
    console.log('\ntargets (issue 6):')
    for (const t of targets) console.log(`  ${t.holds === null ? '–' : t.holds ? 'met    ' : 'NOT met'}  ${t.target}: ${t.figure}`)

    // The pre-audit figure, for builds where audit cannot be switched off.
    const previous = await readFile(join(resultsDir, 'latest.json'), 'utf8').then(text => JSON.parse(text) as { audit?: boolean, summary?: Array<{ id: string, rps: number }>, baselineRps?: number }).catch(() => undefined)
    if (audited && previous?.audit === false) {
      const before = previous.summary?.find(s => s.id === 'bearer')
      const beforeBase = previous.summary?.find(s => s.id === 'fastify-proxy')
      if (Number.isNaN(b)) {
        console.log('audit on/off: audit cannot be switched off in this build; include the bearer and fastify-proxy rows to compare with the pre-audit results (latest.json)')
      } else if (before !== undefined && beforeBase !== undefined) {
        console.log(`audit on/off: audit cannot be switched off in this build; Bearer with audit ${b.toFixed(2)}× the baseline vs ${(before.rps / beforeBase.rps).toFixed(2)}× in the previous, pre-audit results (latest.json)`)
      }
    } else if (!audited) {
      console.log('audit on/off: not available in this build (no gateway/audit module); the Bearer row is the pre-audit figure')
    }

    if (!args.has('--no-micro') && cpuProf === undefined) {
      console.log('')
      await runMicro(sql, dist, gatewayBaseEnv.TOKEN_KEY_ENCRYPTION_KEY)
    }
    const ratios = Object.fromEntries(summary.map(x => [x.id, { vsPlainProxy: paired(x.id, 'fastify-proxy'), vsNginx: paired(x.id, 'nginx') }]))
    await writeResults('table', { audit: audited, connections, seconds, rounds, warmup, responseBytes: bytes, summary, ratios, skipped: rows.filter(r => r.skipped !== undefined).map(r => ({ id: r.spec.id, reason: r.skipped })), extras, targets })
  }

  // Revocation reaching a second instance: two gateway processes on one database; a
  // machine is revoked in the shared repository (what `ehrctl machine revoke` does) and the
  // second instance, which has the machine cached, is polled until it answers 403.
  async function revocation (): Promise<{ count: number, medianMs: number, maxMs: number }> {
    const second = await startGateway({})
    if ('skipped' in second) throw new Error(second.skipped)
    const times: number[] = []
    for (let i = 0; i < revocations; i++) {
      const name = `ws-revoke-${String(i).padStart(2, '0')}`
      const pair = await ca.issueClient({ commonName: name })
      await repo.add(machineRecord(name, describeCertificate(new X509Certificate(pair.cert)), null))
      const pool = new Pool(second.origin, { connections: 1, connect: { ca: ca.cert, cert: pair.cert, key: pair.key, servername: 'localhost' } })
      try {
        const tokenRes = await pool.request({ method: 'POST', path: '/v1/token' })
        const { access_token: token } = await tokenRes.body.json() as { access_token: string }
        const get = async (): Promise<number> => {
          const res = await pool.request({ method: 'GET', path: PATH, headers: { authorization: `Bearer ${token}` } })
          await res.body.dump()
          return res.statusCode
        }
        if (await get() !== 200) throw new Error('the second instance refused a registered machine')
        const t0 = performance.now()
        await repo.revoke(name, 'bench')
        while (await get() !== 403) {
          if (performance.now() - t0 > 10_000) throw new Error('revocation did not reach the second instance within 10 s')
          await sleep(2)
        }
        times.push(performance.now() - t0)
      } finally { await pool.close() }
    }
    times.sort((a, b) => a - b)
    const result = { count: times.length, medianMs: times[Math.floor(times.length / 2)] as number, maxMs: times[times.length - 1] as number }
    console.log(`revocation → 403 on a second instance over ${result.count} revocations: median ${result.medianMs.toFixed(1)} ms, max ${result.maxMs.toFixed(1)} ms`)
    return result
  }

  async function writeResults (kind: string, data: Record<string, unknown>): Promise<void> {
    await mkdir(resultsDir, { recursive: true })
    const json = JSON.stringify({ date: new Date().toISOString(), machine, ...data }, null, 2) + '\n'
    await writeFile(join(resultsDir, `bench-${kind}-${new Date().toISOString().replaceAll(':', '-')}.json`), json)
    await writeFile(join(resultsDir, kind === 'table' ? 'latest.json' : `latest-${kind}.json`), json)
    console.log(`\nresults: ${join(resultsDir, kind === 'table' ? 'latest.json' : `latest-${kind}.json`)}`)
  }
} finally {
  for (const proc of procs.reverse()) await proc.stop()
  await sql.end({ timeout: 1 })
  await admin.unsafe(`drop database if exists ${dbName} with (force)`)
  await admin.end({ timeout: 1 })
  await embedded?.stop()
  await rm(work, { recursive: true, force: true })
  if (pgDir !== undefined) await rm(pgDir, { recursive: true, force: true })
}
