// `npm run demo`: the whole product on one machine with nothing but Node.js. A dev CA and
// certificates, one registered workstation, a synthetic FHIR upstream that insists on an
// API key only the gateway holds, the gateway and its ops listener; then the flow is run
// once and the curl commands to repeat it are printed. Like gateway/server.ts this is a
// process entry point: it alone reads process.env, listens and handles signals.
import { randomBytes } from 'node:crypto'
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import type { AddressInfo } from 'node:net'
import { join, relative, resolve, sep } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { FastifyInstance } from 'fastify'
import postgres from 'postgres'
import { Agent, request } from 'undici'
import type { Dispatcher, Pool } from 'undici'
import { checkMachineCertificate, parseCaBundle } from '../../shared/certificates.js'
import { loadGatewayConfig } from '../../shared/config.js'
import { openDatabase } from '../../shared/db/client.js'
import type { Database } from '../../shared/db/client.js'
import { processAlive } from '../../shared/db/embedded.js'
import { machineRecord, machinesRepository } from '../../shared/db/machines.js'
import { migrate } from '../../shared/db/migrations.js'
import { devKeyEncryptionKey } from '../../shared/dev-secrets.js'
import { GatewayError } from '../../shared/errors.js'
import { maskUrlPassword } from '../../shared/secret.js'
import { buildGateway } from '../app.js'
import { buildOps } from '../ops.js'
import { createUpstreamPool } from '../upstream.js'
import { startFhirUpstream } from './fhir-upstream.js'
import type { FhirUpstream } from './fhir-upstream.js'
import { createDevCa, writeKeyPair } from './pki.js'

const MACHINE = 'ws-demo-01'
const HOST = '127.0.0.1'
const DEFAULT_PORT = 8443
const DEFAULT_OPS_PORT = 9090
// Generous: a first run's initdb plus a slow disk; past it the process is stuck, not slow.
const SHUTDOWN_TIMEOUT_MS = 30_000
const SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const

const USAGE = `usage: node dist/gateway/demo/demo.js [--check]

  --check   run the flow once, print it, stop (exit 0 when it worked); same as DEMO_EXIT_AFTER_FLOW=1

environment:
  DEMO_PORT       gateway port (default ${DEFAULT_PORT}, another free port if that one is busy)
  DEMO_OPS_PORT   ops port (default ${DEFAULT_OPS_PORT} if free, else any free port)
  DEMO_DATA_DIR   working directory (default .data/demo)
  DATABASE_URL    use this Postgres (a throwaway database is created there and dropped at the end)
                  instead of the embedded one
  LOG_LEVEL       gateway log level (default warn)
`

interface DemoOptions {
  readonly check: boolean
  readonly dataDir: string
  readonly port: number | undefined
  readonly opsPort: number | undefined
  readonly databaseUrl: string | undefined
  readonly logLevel: string
}

class UsageError extends Error {}

function parsePort (value: string | undefined, variable: string): number | undefined {
  if (value === undefined || value === '') return undefined
  const port = Number(value)
  if (!/^\d+$/.test(value) || port > 65_535) throw new UsageError(`${variable} must be a port number (0-65535), got '${value}'`)
  return port
}

function parseOptions (argv: readonly string[], env: NodeJS.ProcessEnv): DemoOptions {
  let check = env['DEMO_EXIT_AFTER_FLOW'] === '1' || env['DEMO_EXIT_AFTER_FLOW'] === 'true'
  for (const arg of argv) {
    if (arg === '--check') check = true
    else throw new UsageError(arg === '--help' || arg === '-h' ? '' : `unknown argument '${arg}'`)
  }
  const databaseUrl = env['DATABASE_URL']
  return {
    check,
    dataDir: resolve(env['DEMO_DATA_DIR'] ?? join('.data', 'demo')),
    port: parsePort(env['DEMO_PORT'], 'DEMO_PORT'),
    opsPort: parsePort(env['DEMO_OPS_PORT'], 'DEMO_OPS_PORT'),
    databaseUrl: databaseUrl === '' ? undefined : databaseUrl,
    logLevel: env['LOG_LEVEL'] ?? 'warn'
  }
}

const print = (line = ''): void => { process.stdout.write(line + '\n') }

// The port a listener on HOST:port would get, or undefined when it is taken. The config
// (TOKEN_ISSUER) needs the gateway's port before the gateway exists, so it is probed; the
// window until the real listen is a few milliseconds of a local demo.
async function probePort (port: number): Promise<number | undefined> {
  return await new Promise(resolvePort => {
    const server = createServer()
    server.once('error', () => { resolvePort(undefined) })
    server.listen({ host: HOST, port, exclusive: true }, () => {
      const bound = (server.address() as AddressInfo).port
      server.close(() => { resolvePort(bound) })
    })
  })
}

async function choosePort (requested: number | undefined, fallback: number, variable: string): Promise<number> {
  if (requested !== undefined) {
    const port = await probePort(requested)
    // An explicit choice that is taken is the user's to fix; silently moving would surprise.
    if (port === undefined) throw new UsageError(`${variable}=${requested}: ${HOST}:${requested} is already in use`)
    return port
  }
  return await probePort(fallback) ?? await probePort(0) ?? 0
}

// Shell-safe rendering of a path or argument, so printed commands survive spaces.
function sh (word: string): string {
  return /^[A-Za-z0-9_./:=@%+,-]+$/.test(word) ? word : `'${word.replaceAll("'", "'\\''")}'`
}

// --- database ---------------------------------------------------------------------------

interface DemoDatabase {
  // What the gateway connects to.
  readonly url: string | undefined
  // What to print for ehrctl: never the password of a DATABASE_URL the user brought.
  readonly shown: string
  readonly note: string
  drop(): Promise<void>
}

// DATABASE_URL is the user's server, not the demo's: rather than leave tables in whatever
// database it names, the demo works in a database of its own there and drops it at the end.
async function throwawayDatabase (adminUrl: string): Promise<DemoDatabase> {
  const name = `ehr_gateway_demo_${randomBytes(6).toString('hex')}`
  const admin = postgres(adminUrl, { max: 1, idle_timeout: 2, connect_timeout: 10, onnotice: () => {} })
  try {
    await admin.unsafe(`create database ${name}`)
  } catch (err) {
    await admin.end({ timeout: 1 })
    const code = (err as { code?: string }).code
    // No CREATEDB privilege: the database DATABASE_URL names is then the only place to work.
    if (code === '42501') {
      return { url: adminUrl, shown: maskUrlPassword(adminUrl), note: 'DATABASE_URL (no privilege to create a throwaway database; demo tables stay there)', drop: async () => {} }
    }
    throw new GatewayError('DB_UNREACHABLE', [code ?? (err instanceof Error ? err.message : 'unknown error')], { cause: err })
  }
  const url = new URL(adminUrl)
  url.pathname = `/${name}`
  const masked = url.password !== ''
  return {
    url: url.toString(),
    shown: maskUrlPassword(url.toString()),
    note: `throwaway database ${name} on DATABASE_URL's server, dropped when the demo stops${masked ? '; put your password in place of ***' : ''}`,
    drop: async () => {
      try {
        await admin.unsafe(`drop database if exists ${name} with (force)`)
      } finally {
        await admin.end({ timeout: 1 })
      }
    }
  }
}


// A second demo on the same data directory would join the first one's Postgres and
// re-register ws-demo-01 under its feet; so one demo per data directory.
async function claimDataDir (dataDir: string): Promise<string> {
  const file = join(dataDir, 'demo.pid')
  try {
    await writeFile(file, `${process.pid}\n`, { flag: 'wx' })
    return file
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
  }
  const other = Number((await readFile(file, 'utf8')).trim())
  if (Number.isInteger(other) && other > 0 && other !== process.pid && processAlive(other)) {
    throw new UsageError(`another demo (pid ${other}) is running in ${dataDir}; stop it, or set DEMO_DATA_DIR (if pid ${other} is no demo, delete ${file})`)
  }
  await writeFile(file, `${process.pid}\n`)
  return file
}

// --- the running demo ---------------------------------------------------------------------

interface Running {
  lockFile?: string
  upstream?: FhirUpstream
  demoDb?: DemoDatabase
  db?: Database
  pool?: Pool
  app?: FastifyInstance
  ops?: FastifyInstance
}

async function withTimeout (work: Promise<void>, ms: number, what: string): Promise<void> {
  let timer: NodeJS.Timeout | undefined
  try {
    await Promise.race([work, new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => { reject(new Error(`${what} did not stop within ${ms / 1000} s`)) }, ms)
    })])
  } finally {
    clearTimeout(timer)
  }
}

// postgres.js' codes for a connection the server closed, and Postgres' admin_shutdown.
const DATABASE_GONE = new Set(['CONNECTION_CLOSED', 'CONNECTION_ENDED', 'CONNECTION_DESTROYED', '57P01'])

// Reverse order of dependence, as gateway/server.ts: ops first (load balancers stop
// sending), then the gateway drains, then what it used. Each step runs even if an earlier
// one failed, so a hiccup never leaves a postmaster behind.
async function stopAll (running: Running): Promise<boolean> {
  const started = performance.now()
  const steps: Array<[string, (() => Promise<void>) | undefined]> = [
    ['ops listener', running.ops === undefined ? undefined : async () => { await running.ops?.close() }],
    ['gateway', running.app === undefined ? undefined : async () => { await running.app?.close() }],
    ['upstream pool', running.pool === undefined ? undefined : async () => { await running.pool?.close() }],
    ['FHIR upstream', running.upstream === undefined ? undefined : async () => { await running.upstream?.close() }],
    ['database', running.db === undefined ? undefined : async () => { await running.db?.close() }],
    ['throwaway database', running.demoDb === undefined ? undefined : async () => { await running.demoDb?.drop() }]
  ]
  let ok = true
  let databaseWentFirst = false
  const stopped: string[] = []
  for (const [name, stop] of steps) {
    if (stop === undefined) continue
    try {
      await withTimeout(stop(), 15_000, name)
    } catch (err) {
      const code = (err as { code?: unknown }).code
      // A terminal's Ctrl-C reaches the postmaster as well, which then shuts down at once:
      // the gateway's LISTEN connection failing to UNLISTEN is that, not a fault.
      if (typeof code === 'string' && DATABASE_GONE.has(code) && name !== 'throwaway database') {
        databaseWentFirst = true
      } else {
        ok = false
        process.stderr.write(`demo: stopping the ${name} failed: ${err instanceof Error ? err.message : String(err)}\n`)
        continue
      }
    }
    stopped.push(name)
  }
  // Released only once the postmaster is gone, so a quick restart never races it.
  if (running.lockFile !== undefined) await rm(running.lockFile, { force: true })
  const took = ((performance.now() - started) / 1000).toFixed(1)
  if (stopped.length > 0) print(`Stopped ${stopped.join(', ')} in ${took} s${ok ? '; nothing left running.' : '.'}`)
  if (databaseWentFirst) print('(Postgres received the Ctrl-C too and stopped first; its connections were already closed.)')
  return ok
}

// --- the flow -----------------------------------------------------------------------------

interface Reply { status: number, headers: Record<string, string | string[] | undefined>, text: string }

async function call (dispatcher: Dispatcher, url: string, options: { method?: Dispatcher.HttpMethod, headers?: Record<string, string> } = {}): Promise<Reply> {
  const res = await request(url, { dispatcher, method: options.method ?? 'GET', headers: options.headers ?? {} })
  return { status: res.statusCode, headers: res.headers, text: await res.body.text() }
}

function parseJson (text: string): Record<string, unknown> | undefined {
  try {
    const value: unknown = JSON.parse(text)
    return typeof value === 'object' && value !== null && !Array.isArray(value) ? value as Record<string, unknown> : undefined
  } catch {
    return undefined
  }
}

function excerpt (text: string, fields: readonly string[], max = 110): string {
  const json = parseJson(text)
  if (json === undefined) return text.length > max ? text.slice(0, max) + '…' : text
  const picked = Object.fromEntries(fields.filter(f => json[f] !== undefined).map(f => {
    const v = json[f]
    // A token is a credential: enough of it to recognise, not to reuse.
    return [f, f === 'access_token' && typeof v === 'string' ? `${v.slice(0, 24)}…(${v.length} chars)` : v]
  }))
  const line = JSON.stringify(picked)
  return line.length > max ? line.slice(0, max - 1) + '…' : line
}

// A forged claim rather than random damage: the attacker's real move is to extend `exp`
// or change `sub` and hope nobody checks the signature.
function tamper (token: string): string {
  const [header, payload, signature] = token.split('.')
  if (header === undefined || payload === undefined || signature === undefined) return token + 'x'
  const claims = parseJson(Buffer.from(payload, 'base64url').toString('utf8')) ?? {}
  claims['exp'] = Number(claims['exp'] ?? 0) + 3600
  return [header, Buffer.from(JSON.stringify(claims)).toString('base64url'), signature].join('.')
}

interface FlowInput {
  readonly gatewayUrl: string
  readonly upstream: FhirUpstream
  readonly apiKey: string
  readonly ca: string
  readonly client: { cert: string, key: string }
  readonly patientId: string
}

async function runFlow (input: FlowInput): Promise<boolean> {
  const { gatewayUrl, patientId } = input
  const workstation = new Agent({ connect: { ca: input.ca, cert: input.client.cert, key: input.client.key } })
  const anonymous = new Agent({ connect: { ca: input.ca } })
  const direct = new Agent()
  const replies: Reply[] = []
  let ok = true
  const step = (label: string, reply: Reply, want: number, wantCode: string | undefined, fields: readonly string[], extra = true): void => {
    replies.push(reply)
    const code = parseJson(reply.text)?.['code']
    const passed = reply.status === want && (wantCode === undefined || code === wantCode) && extra
    if (!passed) ok = false
    print(`  ${passed ? '✓' : '✗'} ${reply.status}  ${label}${passed ? '' : `   (expected ${want}${wantCode === undefined ? '' : ' ' + wantCode})`}`)
    print(`         ${excerpt(reply.text, fields)}`)
  }
  try {
    const tokenReply = await call(workstation, `${gatewayUrl}/v1/token`, { method: 'POST' })
    const token = parseJson(tokenReply.text)?.['access_token']
    step(`POST /v1/token with the ${MACHINE} certificate`, tokenReply, 200, undefined, ['access_token', 'token_type', 'expires_in'], typeof token === 'string')
    if (typeof token !== 'string') return false
    const bearer = { authorization: `Bearer ${token}` }

    const patient = await call(workstation, `${gatewayUrl}/fhir/Patient/${patientId}`, { headers: bearer })
    step(`GET /fhir/Patient/${patientId} with the token`, patient, 200, undefined, ['resourceType', 'id', 'name', 'birthDate'],
      parseJson(patient.text)?.['id'] === patientId)

    step('the same token from a client without a certificate',
      await call(anonymous, `${gatewayUrl}/fhir/Patient/${patientId}`, { headers: bearer }), 401, 'CLIENT_CERT_REQUIRED', ['code', 'detail'])

    step('a tampered token (exp pushed an hour later, signature kept)',
      await call(workstation, `${gatewayUrl}/fhir/Patient/${patientId}`, { headers: { authorization: `Bearer ${tamper(token)}` } }),
      401, 'TOKEN_INVALID', ['code', 'detail'])

    // Not through the gateway: shows the upstream really demands the key the gateway adds.
    const upstreamReply = await call(direct, `${input.upstream.url}/Patient/${patientId}`)
    print(`  ${upstreamReply.status === 401 ? '✓' : '✗'} ${upstreamReply.status}  the upstream itself, asked directly without the API key`)
    if (upstreamReply.status !== 401) ok = false

    const leaked = replies.some(r => r.text.includes(input.apiKey) || JSON.stringify(r.headers).includes(input.apiKey))
    print(`  ${leaked ? '✗' : '✓'} the upstream API key was added by the gateway and appears in no response it sent`)
    if (leaked) ok = false
  } finally {
    await Promise.all([workstation.close(), anonymous.close(), direct.close()])
  }
  return ok
}

// --- main ---------------------------------------------------------------------------------

function printTryIt (info: {
  gatewayUrl: string
  opsUrl: string
  caFile: string
  certFile: string
  keyFile: string
  kekFile: string
  patientId: string
  database: string
  databaseNote: string
}): void {
  const { gatewayUrl, caFile, certFile, keyFile } = info
  const mtls = `curl --cacert ${sh(caFile)} --cert ${sh(certFile)} --key ${sh(keyFile)}`
  const ehrctlJs = fileURLToPath(new URL('../../cli/ehrctl.js', import.meta.url))
  const rel = relative(process.cwd(), ehrctlJs)
  const ehrctl = `node ${sh(rel.startsWith('..') || rel.startsWith(sep) ? ehrctlJs : rel)}`
  const extract = `node -pe 'JSON.parse(require("fs").readFileSync(0, "utf8")).access_token'`
  print('Try it yourself (copy and paste):')
  print()
  print('  # a token for the workstation: its certificate is the only credential')
  print(`  ${mtls} -X POST ${gatewayUrl}/v1/token`)
  print()
  print('  # keep a token, then read a patient through the gateway (it adds the upstream API key)')
  print(`  TOKEN=$(${mtls} -s -X POST ${gatewayUrl}/v1/token | ${extract})`)
  print(`  ${mtls} -H "Authorization: Bearer $TOKEN" ${gatewayUrl}/fhir/Patient/${info.patientId}`)
  print(`  ${mtls} -H "Authorization: Bearer $TOKEN" '${gatewayUrl}/fhir/Patient?name=testpatient'`)
  print()
  print('  # the same token without the client certificate: 401 CLIENT_CERT_REQUIRED')
  print(`  curl --cacert ${sh(caFile)} -H "Authorization: Bearer $TOKEN" ${gatewayUrl}/fhir/Patient/${info.patientId}`)
  print()
  print('  # ops listener (plain HTTP, loopback only): readiness and Prometheus metrics')
  print(`  curl ${info.opsUrl}/readyz`)
  print(`  curl ${info.opsUrl}/metrics`)
  print()
  print(`  # ehrctl against the demo's database (${info.databaseNote})`)
  print(`  export DATABASE_URL=${sh(info.database)} TLS_CLIENT_CA_FILE=${sh(caFile)} TOKEN_KEY_ENCRYPTION_KEY_FILE=${sh(info.kekFile)}`)
  print(`  ${ehrctl} machine list`)
  print(`  ${ehrctl} machine show ${MACHINE}`)
  print(`  ${ehrctl} keys list`)
  print(`  ${ehrctl} machine revoke ${MACHINE} --reason 'demo'   # then the Patient read answers 403 MACHINE_REVOKED`)
  print()
}

async function main (options: DemoOptions, running: Running): Promise<boolean> {
  const started = performance.now()
  const seconds = (from: number): string => `${((performance.now() - from) / 1000).toFixed(1)} s`
  const shown = (path: string): string => {
    const rel = relative(process.cwd(), path)
    return rel.startsWith('..') || rel === '' ? path : rel
  }
  await mkdir(options.dataDir, { recursive: true })
  running.lockFile = await claimDataDir(options.dataDir)
  print(`ehr-gateway demo — throwaway data in ${shown(options.dataDir)}`)
  print()

  // Fresh every run: nothing to keep, and an expired certificate can never trip the demo.
  const pkiDir = join(options.dataDir, 'pki')
  const ca = await createDevCa()
  const server = await writeKeyPair(pkiDir, 'server', await ca.issueServer({ commonName: 'localhost', dnsNames: ['localhost'], ipAddresses: ['127.0.0.1', '::1'] }))
  // Only the CA certificate: its key stays in memory and dies with the process, so nothing
  // on disk can mint another workstation.
  const caFile = join(pkiDir, 'ca.crt')
  await writeFile(caFile, ca.cert)
  const clientPair = await ca.issueClient({ commonName: MACHINE })
  const client = await writeKeyPair(pkiDir, MACHINE, clientPair)
  print(`  pki       dev CA, server certificate (localhost, 127.0.0.1), client certificate ${MACHINE} in ${shown(pkiDir)}/`)

  // Random per run, never printed: the flow proves the workstation never needs to know it.
  const apiKey = randomBytes(24).toString('base64url')
  running.upstream = await startFhirUpstream({ host: HOST, port: 0, apiKey })
  const patientId = running.upstream.patients[0]?.id ?? 'example-0001'
  print(`  upstream  synthetic FHIR server ${running.upstream.url} (${running.upstream.patients.length} made-up patients; refuses requests without its API key)`)

  const port = await choosePort(options.port, DEFAULT_PORT, 'DEMO_PORT')
  const opsPort = await choosePort(options.opsPort, DEFAULT_OPS_PORT, 'DEMO_OPS_PORT')
  if (options.port === undefined && port !== DEFAULT_PORT) print(`  note      port ${DEFAULT_PORT} is busy; the gateway uses ${port}`)

  if (options.databaseUrl !== undefined) running.demoDb = await throwawayDatabase(options.databaseUrl)
  const config = loadGatewayConfig({
    NODE_ENV: 'development',
    DATABASE_URL: running.demoDb?.url,
    GATEWAY_HOST: HOST,
    GATEWAY_PORT: String(port),
    OPS_HOST: HOST,
    OPS_PORT: String(opsPort),
    TLS_CERT_FILE: server.certFile,
    TLS_KEY_FILE: server.keyFile,
    TLS_CLIENT_CA_FILE: caFile,
    EHR_UPSTREAM_URL: running.upstream.url,
    EHR_API_KEY: apiKey,
    TOKEN_ISSUER: `https://localhost:${port}`,
    LOG_LEVEL: options.logLevel
  }, { devKeyEncryptionKey: devKeyEncryptionKey(options.dataDir) })

  const dbStarted = performance.now()
  // Kept for a failed start only: Postgres' own words are the best diagnosis.
  const pgLog: string[] = []
  try {
    running.db = await openDatabase(config, { embeddedDir: options.dataDir, log: line => { pgLog.push(line); if (pgLog.length > 40) pgLog.shift() } })
  } catch (err) {
    if (pgLog.length > 0 && stopping === undefined) process.stderr.write(pgLog.join('\n') + '\n')
    throw err
  }
  const embeddedUrl = running.db.embedded?.url
  const migration = await migrate(running.db.sql)
  const dbInfo = embeddedUrl !== undefined
    ? `embedded Postgres in ${shown(join(options.dataDir, 'postgres'))}`
    : running.demoDb?.note ?? 'DATABASE_URL'
  print(`  database  ${dbInfo}, schema v${migration.to}${migration.applied.length > 0 ? ' (migrated now)' : ''} — ${seconds(dbStarted)}`)

  // The checks and the repository `ehrctl machine add` uses, so the demo registers exactly
  // as an admin would.
  const cert = checkMachineCertificate(clientPair.cert, client.certFile, parseCaBundle(ca.cert, caFile), new Date())
  const machines = machinesRepository(running.db.sql)
  const existing = await machines.findByName(MACHINE)
  const active = existing !== undefined && existing.revokedAt === null ? existing : undefined
  let registration = 'registered'
  if (active?.fingerprint === cert.fingerprint) {
    registration = 'already registered'
  } else {
    // A name belongs to one active certificate; the last run's is replaced as an admin would.
    if (active !== undefined) {
      await machines.revoke(MACHINE, 'replaced by a new demo certificate')
      registration = 'registered (the previous run\'s certificate revoked)'
    }
    await machines.add(machineRecord(MACHINE, cert, 'npm run demo'))
  }
  print(`  machine   ${MACHINE} ${registration}, x5t#S256 ${cert.fingerprint.slice(0, 16)}…`)

  running.pool = createUpstreamPool(config)
  running.app = await buildGateway(config, { sql: running.db.sql, upstream: running.pool })
  running.ops = buildOps(running.app.gateway, running.db.sql)
  await running.app.listen({ host: config.gateway.host, port: config.gateway.port })
  await running.ops.listen({ host: config.ops.host, port: config.ops.port })
  const opsUrl = `http://${HOST}:${(running.ops.server.address() as AddressInfo).port}`
  const gatewayUrl = `https://localhost:${(running.app.server.address() as AddressInfo).port}`
  print(`  gateway   ${gatewayUrl} (mutual TLS), ops ${opsUrl}`)
  print()
  // performance.now() counts from process start: Node's boot and module loading included.
  print(`Ready ${(performance.now() / 1000).toFixed(1)} s after start (set-up took ${seconds(started)}).`)
  print()

  print('The flow, run once by the demo itself:')
  const ok = await runFlow({ gatewayUrl, upstream: running.upstream, apiKey, ca: ca.cert, client: clientPair, patientId })
  print()

  printTryIt({
    gatewayUrl,
    opsUrl,
    caFile,
    certFile: client.certFile,
    keyFile: client.keyFile,
    kekFile: join(options.dataDir, 'token-kek'),
    patientId,
    database: embeddedUrl ?? running.demoDb?.shown ?? '',
    databaseNote: embeddedUrl !== undefined
      ? 'a throwaway local database: its generated password is shown on purpose; the port changes every run'
      : running.demoDb?.note ?? 'DATABASE_URL'
  })
  if (!ok) process.stderr.write('demo: the flow did not go as expected (✗ above)\n')
  return ok
}

function report (err: unknown): void {
  // One line to act on, as gateway/server.ts does; the config error lists every variable.
  const message = err instanceof GatewayError ? `${err.code}: ${err.message}` : (err instanceof Error ? err.message : String(err))
  process.stderr.write(`demo: ${message}\n`)
}

let options: DemoOptions
try {
  options = parseOptions(process.argv.slice(2), process.env)
} catch (err) {
  if (!(err instanceof UsageError)) throw err
  if (err.message !== '') process.stderr.write(`demo: ${err.message}\n\n`)
  process.stderr.write(USAGE)
  process.exit(err.message === '' ? 0 : 2)
}

const running: Running = {}
let startup: Promise<boolean> | undefined
let stopping: Promise<void> | undefined
const stop = async (code: number): Promise<void> => {
  stopping ??= (async () => {
    const force = setTimeout(() => {
      process.stderr.write('demo: shutdown is stuck; exiting\n')
      process.exit(1)
    }, SHUTDOWN_TIMEOUT_MS).unref()
    // A signal during start-up lets it finish first: stopping the parts built so far while
    // main() goes on adding more would leave the late ones running.
    await startup?.catch(() => false)
    const clean = await stopAll(running)
    clearTimeout(force)
    process.exitCode = clean ? code : 1
  })()
  await stopping
}

// A second Ctrl-C means "now"; a postmaster left by that is stopped by the next start.
const onSignal = (signal: NodeJS.Signals): void => {
  if (stopping !== undefined) {
    process.stderr.write(`demo: ${signal} again; exiting now\n`)
    process.exit(1)
  }
  print()
  print(`${signal}: stopping…`)
  void stop(0)
}
for (const signal of SIGNALS) process.on(signal, onSignal)

try {
  startup = main(options, running)
  const ok = await startup
  if (options.check) await stop(ok ? 0 : 1)
  else if (stopping === undefined) print('Running. Press Ctrl-C to stop everything (gateway, ops, upstream, database).')
} catch (err) {
  // A Ctrl-C reaches initdb and the postmaster too, so a start it interrupts fails; the
  // user asked for the stop, which is not news and not a failure.
  if (stopping === undefined) report(err)
  else print('Start-up interrupted.')
  await stop(1)
}
