import { X509Certificate } from 'node:crypto'
import { existsSync } from 'node:fs'
import { readFile, rename, symlink } from 'node:fs/promises'
import { join } from 'node:path'
import { connect } from 'node:tls'
import t from 'tap'
import { request } from 'undici'
import { writeKeyPair } from '../../gateway/demo/pki.js'
import { createPki } from '../helpers/gateway.js'
import type { Pki } from '../helpers/gateway.js'
import { SERVER, developmentDir, once, serverSetup, spawnServer } from '../helpers/process.js'
import type { LogLine, ServerProcess, ServerSetup } from '../helpers/process.js'

if (!existsSync(SERVER)) t.plan(0, 'dist/ missing: npm test builds before running the suite')

const isMsg = (msg: string) => (l: LogLine): boolean => l['msg'] === msg
const gatewayUrl = (ready: LogLine): string => String(ready['gateway']).replace('127.0.0.1', 'localhost')

async function token (url: string, setup: ServerSetup): Promise<string> {
  const res = await once(url, setup, '/v1/token', { method: 'POST' })
  if (res.status !== 200) throw new Error(`token: ${res.status} ${res.text}`)
  return (JSON.parse(res.text) as { access_token: string }).access_token
}

// The pids that wrote access-log lines since line `from`.
const servedBy = (server: ServerProcess, from: number): Set<unknown> =>
  new Set(server.lines.slice(from).filter(isMsg('request')).map(l => l['pid']))

function sample (metrics: string, line: RegExp): number {
  const m = line.exec(metrics)
  return m === null ? Number.NaN : Number(m[1])
}

t.test('GATEWAY_WORKERS=2: two workers serve, a killed one is replaced, SIGTERM drains them all', async t => {
  const setup = await serverSetup(t)
  const server = spawnServer(t, { ...setup.env, GATEWAY_WORKERS: '2' })
  const ready = await server.line(isMsg('ehr-gateway ready'), 'the primary to be ready')
  const url = gatewayUrl(ready)
  // Worker log lines travel apart from the IPC message that made the primary say ready.
  await server.line(() => server.lines.filter(isMsg('worker ready')).length === 2, 'both workers to log ready')
  const workers = server.lines.filter(isMsg('worker ready')).map(l => l['pid'])
  t.equal(new Set(workers).size, 2, 'two worker processes, each logging its pid')
  t.same(new Set(ready['workers'] as unknown[]), new Set(workers), 'the primary names them')
  t.notOk(workers.includes(server.child.pid), 'the primary serves nothing itself')

  // Two workers starting together on a fresh database made one signing key between them.
  t.equal((await setup.db.sql`select count(*)::int as n from signing_keys`)[0]?.['n'], 1, 'one signing key, not one per worker')

  // Round robin: consecutive connections land on alternate workers.
  let from = server.lines.length
  const bearer = await token(url, setup)
  for (let i = 0; i < 6; i++) {
    const res = await once(url, setup, '/fhir/Patient/1', { headers: { authorization: `Bearer ${bearer}` } })
    t.equal(res.status, 200, 'a token from one worker is good on every worker')
  }
  await server.line(() => servedBy(server, from).size === 2, 'access-log lines of both workers').catch(() => {})
  t.same(servedBy(server, from), new Set(workers), 'both workers served requests')

  // The primary answers the ops listener for all of them: one aggregated scrape.
  const ops = String(ready['ops'])
  const metrics = await (await request(`${ops}/metrics`)).body.text()
  t.equal(sample(metrics, /^ehr_gateway_requests_total\{route="\/fhir\/\*",method="GET",status="200",code=""\} (\d+)$/m), 6, 'requests summed over workers')
  t.equal(sample(metrics, /^ehr_gateway_tokens_issued_total (\d+)$/m), 1)
  t.equal(sample(metrics, /^ehr_gateway_workers (\d+)$/m), 2)
  t.equal((await request(`${ops}/readyz`)).statusCode, 200)

  // A crashed worker is replaced; the other one serves meanwhile.
  const victim = workers[0] as number
  process.kill(victim, 'SIGKILL')
  const exit = await server.line(l => isMsg('worker exited unexpectedly; starting a replacement')(l) && l['worker'] === victim, 'the crash to be noticed')
  t.equal(exit['signal'], 'SIGKILL')
  t.equal(exit['level'], 50, 'logged as an error')
  t.equal((await once(url, setup, '/fhir/Patient/2', { headers: { authorization: `Bearer ${bearer}` } })).status, 200, 'service continues')
  const replacement = await server.line(isMsg('replacement worker ready'), 'the replacement')
  t.not(replacement['worker'], victim)
  t.notOk(workers.includes(replacement['worker']), 'a new process')
  from = server.lines.length
  for (let i = 0; i < 4; i++) t.equal((await once(url, setup, '/fhir/Patient/3', { headers: { authorization: `Bearer ${bearer}` } })).status, 200)
  await server.line(() => servedBy(server, from).has(replacement['worker']), 'the replacement\'s access-log lines').catch(() => {})
  t.ok(servedBy(server, from).has(replacement['worker']), 'the replacement serves')
  const after = await (await request(`${ops}/metrics`)).body.text()
  t.equal(sample(after, /^ehr_gateway_worker_restarts_total (\d+)$/m), 1)

  // SIGTERM to the primary: a request in flight completes, every worker closes in order,
  // and the primary exits 0.
  setup.upstream.setHandler(async (_req, res) => {
    await new Promise(resolve => setTimeout(resolve, 1000))
    res.writeHead(200, { 'content-type': 'application/fhir+json' })
    res.end('{"resourceType":"Patient","id":"slow"}')
  })
  const inFlight = once(url, setup, '/fhir/Patient/slow', { headers: { authorization: `Bearer ${bearer}` } })
  await new Promise(resolve => setTimeout(resolve, 300))
  server.child.kill('SIGTERM')
  const slow = await inFlight
  t.equal(slow.status, 200, 'the in-flight request completed')
  t.match(slow.text, '"slow"')
  t.equal(await server.exited, 0, server.stderr)
  t.equal(server.lines.filter(isMsg('shutting down: draining in-flight requests')).length, 2, 'each worker drained')
  t.ok(server.lines.some(isMsg('all workers stopped')))
})

t.test('a worker that cannot start fails the whole start instead of looping', async t => {
  const setup = await serverSetup(t)
  const server = spawnServer(t, { ...setup.env, GATEWAY_WORKERS: '2', TLS_KEY_FILE: setup.pki.caFile.replace(/ca\.crt$/, 'ca.key') })
  t.equal(await server.exited, 1)
  t.match(server.stderr, /is not the key of the certificate/, 'the worker said why')
  t.match(server.stderr, /exited with code 1 during the start/)
  t.notOk(server.lines.some(isMsg('worker exited unexpectedly; starting a replacement')))
})

// The served certificate, read from a fresh connection's handshake.
async function servedFingerprint (url: string, ca: string): Promise<string> {
  const { port } = new URL(url)
  return await new Promise((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port: Number(port), servername: 'localhost', ca }, () => {
      resolve(socket.getPeerX509Certificate()?.fingerprint256 ?? '')
      socket.end()
    })
    socket.on('error', reject)
  })
}

t.test('SIGHUP to the primary reloads the TLS files in every worker', async t => {
  // The files live under a symlinked directory, `current -> v1`, switched to v2 by a rename
  // in a directory the gateway does not watch: a change only SIGHUP announces, as on file
  // systems without inotify.
  const base = await createPki(t)
  const dir = join(base.dir, 'server-tls')
  const v1 = join(dir, 'v1')
  const v2 = join(dir, 'v2')
  const next = await base.ca.issueServer({ commonName: 'localhost' })
  await writeKeyPair(v1, 'server', { cert: await readFile(base.certFile, 'utf8'), key: await readFile(base.keyFile, 'utf8') })
  await writeKeyPair(v2, 'server', next)
  await symlink(v1, join(dir, 'current'))
  const pki: Pki = { ...base, certFile: join(dir, 'current', 'server.crt'), keyFile: join(dir, 'current', 'server.key') }
  const setup = await serverSetup(t, pki)
  const server = spawnServer(t, { ...setup.env, GATEWAY_WORKERS: '2' })
  const url = gatewayUrl(await server.line(isMsg('ehr-gateway ready'), 'the primary to be ready'))
  const before = await servedFingerprint(url, base.ca.cert)

  await symlink(v2, join(dir, 'current.tmp'))
  await rename(join(dir, 'current.tmp'), join(dir, 'current'))
  await new Promise(resolve => setTimeout(resolve, 800))
  t.equal(await servedFingerprint(url, base.ca.cert), before, 'no file event for this change')

  server.child.kill('SIGHUP')
  const reloaded = (l: LogLine): boolean => l['msg'] === 'TLS certificate and client CA reloaded' && l['trigger'] === 'SIGHUP'
  await server.line(l => reloaded(l) && server.lines.filter(reloaded).length === 2, 'both workers to reload')
  t.equal(new Set(server.lines.filter(reloaded).map(l => l['pid'])).size, 2, 'each worker reloaded')
  const expected = new X509Certificate(next.cert).fingerprint256
  for (let i = 0; i < 4; i++) t.equal(await servedFingerprint(url, base.ca.cert), expected, 'new connections get the new certificate')
  t.equal(server.child.exitCode, null, 'SIGHUP does not stop the process')
  server.child.kill('SIGTERM')
  t.equal(await server.exited, 0, server.stderr)
})

// Development without DATABASE_URL: the primary starts the embedded Postgres once and hands
// its URL to the workers (rather than each worker racing to start its own), and stops it.
t.test('with workers, the primary owns the embedded development Postgres', async t => {
  const pki = await createPki(t)
  const dir = developmentDir(t, pki, ['GATEWAY_WORKERS=2'])
  const server = spawnServer(t, {}, dir)
  t.equal(await server.exited, 1)
  t.match(server.stderr, /DB_NOT_MIGRATED/, 'a worker reached the embedded database, unmigrated')
  t.notMatch(server.stderr, /joining the embedded Postgres|EMBEDDED_DB/)
  t.ok(existsSync(`${dir}/.data/postgres/PG_VERSION`), 'initialised in ./.data')
  t.notOk(existsSync(`${dir}/.data/postgres.owner`), 'and the primary stopped it again')
})
