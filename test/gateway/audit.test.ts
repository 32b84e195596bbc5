import { randomBytes } from 'node:crypto'
import type { AddressInfo } from 'node:net'
import postgres from 'postgres'
import { request } from 'undici'
import { buildOps } from '../../gateway/ops.js'
import t from 'tap'
import type { Test } from 'tap'
import { auditRepository } from '../../shared/db/audit.js'
import type { AuditEntry } from '../../shared/db/audit.js'
import { assertProblem } from '../helpers/assert.js'
import { adminUrl } from '../helpers/db.js'
import { TEST_API_KEY, startGateway } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'

const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

function admin (t: Test) {
  const sql = postgres(adminUrl(), { max: 2, onnotice: () => {} })
  t.teardown(async () => { await sql.end({ timeout: 1 }) })
  return sql
}

const dbName = (gw: TestGateway): string => new URL(gw.db.url).pathname.slice(1)

async function rows (gw: TestGateway): Promise<AuditEntry[]> {
  const newestFirst = await auditRepository(gw.db.sql).list({}, 1_000_000)
  return newestFirst.sort((a, b) => Number(a.id) - Number(b.id))
}

async function ready (gw: TestGateway, name: string) {
  const { machine, pair } = await gw.register(name)
  const agent = gw.agent(pair)
  const token = await gw.fetchToken(agent)
  return { machine, agent, token, auth: { authorization: `Bearer ${token}` } }
}

t.test('one row per request to the proxy and the token endpoint, allowed or refused, with names but no values', async t => {
  const gw = await startGateway(t, { env: { AUDIT_FLUSH_INTERVAL_MS: '10' } })
  const { machine, agent, token, auth } = await ready(gw, 'ws-audit')
  const ok = await gw.call(agent, '/fhir/Patient/123/_history/2', { headers: auth })
  t.equal(ok.status, 200)
  const search = await gw.call(agent, '/fhir/Patient?name=Jane%20Doe&birthdate=1970-01-01&name=Smith', { headers: auth })
  t.equal(search.status, 200)
  const post = await gw.call(agent, '/fhir/Observation', { method: 'POST', headers: { ...auth, 'content-type': 'application/fhir+json' }, body: '{"resourceType":"Observation","note":"secret diagnosis"}' })
  t.equal(post.status, 200)
  const meta = await gw.call(agent, '/fhir/metadata', { headers: auth })
  t.equal(meta.status, 200)
  const noToken = await gw.call(agent, '/fhir/Patient/9')
  assertProblem(t, noToken, 401, 'TOKEN_MISSING')
  const stranger = gw.agent(await gw.pki.ca.issueClient({ commonName: 'stranger' }))
  assertProblem(t, await gw.call(stranger, '/v1/token', { method: 'POST' }), 403, 'MACHINE_NOT_REGISTERED')
  const notAudited = await gw.call(agent, '/.well-known/jwks.json')
  t.equal(notAudited.status, 200)

  await gw.app.close()
  const all = await rows(gw)
  // The first row is the token request in ready().
  t.equal(all.length, 7, 'token, 4 proxied, 1 refused proxy, 1 refused token; jwks not audited')
  const byId = new Map(all.map(r => [r.requestId, r]))
  const tokenRow = all[0] as AuditEntry
  t.match(tokenRow, { route: '/v1/token', method: 'POST', status: 200, machineName: 'ws-audit', machineId: machine.id, certThumbprint: machine.fingerprint, errorCode: null })
  t.match(tokenRow.tokenJti, /^[\w-]{10,}$/, 'the issued jti')
  t.ok(Number(tokenRow.bytesOut) > 0)

  const okRow = byId.get(String(ok.headers['x-request-id']))
  t.match(okRow, { route: '/fhir/*', path: '/fhir/Patient/123/_history/2', resourceType: 'Patient', resourceId: '123', status: 200, tokenJti: tokenRow.tokenJti, clientIp: /127\.0\.0\.1$/ })
  t.ok(okRow !== undefined && okRow.upstreamMs !== null && okRow.upstreamMs >= 0, 'upstream latency recorded')
  t.ok(okRow !== undefined && okRow.durationMs >= (okRow.upstreamMs ?? 0))
  const searchRow = byId.get(String(search.headers['x-request-id']))
  t.match(searchRow, { path: '/fhir/Patient', resourceType: 'Patient', resourceId: null, queryParams: ['name', 'birthdate'] })
  const postRow = byId.get(String(post.headers['x-request-id']))
  t.match(postRow, { method: 'POST', resourceType: 'Observation', bytesIn: 56 })
  t.match(byId.get(String(meta.headers['x-request-id'])), { path: '/fhir/metadata', resourceType: null, resourceId: null })
  t.match(byId.get(String(noToken.headers['x-request-id'])), { status: 401, errorCode: 'TOKEN_MISSING', machineName: 'ws-audit', tokenJti: null })
  const strangerRow = all.find(r => r.errorCode === 'MACHINE_NOT_REGISTERED')
  t.match(strangerRow, { status: 403, machineName: null, route: '/v1/token' })
  t.match(strangerRow?.certThumbprint, /^[\w-]{43}$/, 'the unregistered certificate is named by fingerprint')

  // STYLE §7: no query values (PHI), no bodies, no credentials in any row.
  // Whole values only: a short fragment like '1970' turns up in random ids now and then.
  const text = JSON.stringify(all)
  for (const forbidden of ['Jane', 'Smith', '1970-01-01', 'secret diagnosis', token, TEST_API_KEY]) {
    t.notOk(text.includes(forbidden), `no ${forbidden.slice(0, 12)}… in audit rows`)
  }
})

t.test('cutting the database connections mid-stream loses no row and duplicates none', async t => {
  const gw = await startGateway(t, { env: { AUDIT_BATCH_SIZE: '5', AUDIT_FLUSH_INTERVAL_MS: '5', RATE_LIMIT_MAX: '1000000' } })
  const { agent, auth } = await ready(gw, 'ws-stream')
  const killer = admin(t)
  const answered: Array<{ id: string, status: number }> = []
  let stop = false
  const client = async (): Promise<void> => {
    while (!stop) {
      const res = await gw.call(agent, `/fhir/Patient/${answered.length}?_count=1`, { headers: auth })
      answered.push({ id: String(res.headers['x-request-id']), status: res.status })
    }
  }
  const clients = Array.from({ length: 6 }, client)

  // Holds audit_log locked so an insert is certainly in flight, then cuts every other
  // connection of the gateway's database: that insert dies mid-statement, unacknowledged.
  const locker = postgres(gw.db.url, { max: 1, onnotice: () => {} })
  t.teardown(async () => { await locker.end({ timeout: 1 }) })
  let cutDuringWrite = 0
  let cuts = 0
  for (let round = 0; round < 6; round++) {
    await sleep(60)
    await locker.begin(async tx => {
      await tx.unsafe('lock table audit_log in access exclusive mode')
      const [me] = await tx<Array<{ pid: number }>>`select pg_backend_pid() as pid`
      // The writer may be in its retry back-off (up to 5 s) after the previous cut.
      for (const until = Date.now() + 15_000; Date.now() < until;) {
        const [waiting] = await killer<Array<{ n: number }>>`
          select count(*)::int as n from pg_stat_activity
          where datname = ${dbName(gw)} and query ilike '%insert into audit_log%' and wait_event_type = 'Lock'`
        if ((waiting?.n ?? 0) > 0) { cutDuringWrite++; break }
        await sleep(5)
      }
      const killed = await killer`
        select pg_terminate_backend(pid) from pg_stat_activity
        where datname = ${dbName(gw)} and pid <> ${me?.pid ?? 0} and backend_type = 'client backend'`
      cuts += killed.length
    })
  }
  stop = true
  await Promise.all(clients)
  await gw.app.close()

  const all = await rows(gw)
  const proxied = all.filter(r => r.route === '/fhir/*')
  const succeeded = answered.filter(a => a.status === 200).length
  t.comment(`${answered.length} answered (${succeeded} 200), ${cuts} connections cut, ${cutDuringWrite} during an insert, ${Number(await failures(gw))} failed writes`)
  t.ok(answered.length > 50, 'a real stream of requests')
  t.equal(proxied.filter(r => r.status === 200).length, succeeded, 'as many 200 rows as 200 answers')
  t.equal(proxied.length, answered.length, 'one row per answer')
  t.same(new Set(proxied.map(r => r.requestId)), new Set(answered.map(a => a.id)), 'the same request ids')
  t.ok(cuts > 0)
  t.equal(cutDuringWrite, 6, 'every cut hit an insert in flight')
  t.ok(await failures(gw) >= 6, 'and those writes failed, then were retried')
})

async function failures (gw: TestGateway): Promise<number> {
  const metric = await gw.app.gateway.metrics.auditWriteFailures.get()
  return metric.values[0]?.value ?? 0
}

// The database stalls (its table locked, as a long migration or a hung failover would) with
// a tiny buffer: the gateway refuses rather than serve unaudited, says so once, and serves
// again by itself when the rows are written.
t.test('a full buffer refuses EHR traffic and token issuance with AUDIT_UNAVAILABLE until it drains', async t => {
  const gw = await startGateway(t, { env: { AUDIT_BUFFER_MAX: '3', AUDIT_BATCH_SIZE: '1', AUDIT_FLUSH_INTERVAL_MS: '5' } })
  const { agent, auth } = await ready(gw, 'ws-full')
  const ops = buildOps(gw.app.gateway, gw.db.sql)
  await ops.listen({ host: '127.0.0.1', port: 0 })
  t.teardown(async () => { await ops.close() })
  const opsUrl = `http://127.0.0.1:${(ops.server.address() as AddressInfo).port}`
  await sleep(50) // the token row is written
  const locker = postgres(gw.db.url, { max: 1, onnotice: () => {} })
  t.teardown(async () => { await locker.end({ timeout: 1 }) })
  const statuses: number[] = []
  await locker.begin(async tx => {
    await tx.unsafe('lock table audit_log in access exclusive mode')
    for (let i = 0; i < 5; i++) {
      const res = await gw.call(agent, `/fhir/Patient/${i}`, { headers: auth })
      statuses.push(res.status)
      if (res.status !== 200) {
        assertProblem(t, res, 503, 'AUDIT_UNAVAILABLE')
        t.equal(res.headers['retry-after'], '5')
      }
      await sleep(20) // the answered request's row is recorded before the next arrives
    }
    assertProblem(t, await gw.call(agent, '/v1/token', { method: 'POST' }), 503, 'AUDIT_UNAVAILABLE')
    const ready = await request(`${opsUrl}/readyz`)
    t.equal(ready.statusCode, 503, 'out of the load balancer while full')
    t.match(await ready.body.text(), /audit buffer full/)
    t.equal(gw.upstream.requests.length, 3, 'nothing reached the EHR unaudited')
  })
  t.same(statuses, [200, 200, 200, 503, 503])
  let res = await gw.call(agent, '/fhir/Patient/after', { headers: auth })
  for (let i = 0; i < 50 && res.status !== 200; i++) {
    await sleep(20)
    res = await gw.call(agent, '/fhir/Patient/after', { headers: auth })
  }
  t.equal(res.status, 200, 'serving again once the rows are written')
  await gw.app.close()
  const all = await rows(gw)
  t.equal(all.length, 5, 'token + the 3 served while stalled + the one after: refusals are not rows')
  t.ok(all.every(r => r.status === 200))
  const full = gw.logs.filter(l => l.includes('audit buffer full'))
  t.equal(full.length, 1, 'logged once per episode')
  t.ok(gw.logs.some(l => l.includes('audit buffer has room again')))
  const refusals = await gw.app.gateway.metrics.auditRefusals.get()
  t.ok((refusals.values[0]?.value ?? 0) >= 3, 'refusals counted')
})

t.test('closing the gateway writes what is buffered first', async t => {
  const gw = await startGateway(t, { env: { AUDIT_FLUSH_INTERVAL_MS: '60000', AUDIT_BATCH_SIZE: '1000' } })
  const { agent, auth } = await ready(gw, 'ws-close')
  for (let i = 0; i < 5; i++) t.equal((await gw.call(agent, `/fhir/Patient/${i}`, { headers: auth })).status, 200)
  t.equal((await rows(gw)).length, 0, 'nothing written yet (one batch a minute)')
  await gw.app.close()
  t.equal((await rows(gw)).length, 6)
})

t.test('a shutdown the database does not answer gives up after AUDIT_CLOSE_TIMEOUT_MS and logs each row', async t => {
  const gw = await startGateway(t, { env: { AUDIT_FLUSH_INTERVAL_MS: '60000', AUDIT_BATCH_SIZE: '1000', AUDIT_CLOSE_TIMEOUT_MS: '300' } })
  const { agent, auth } = await ready(gw, 'ws-stuck')
  const res = await gw.call(agent, '/fhir/Patient/1', { headers: auth })
  const locker = postgres(gw.db.url, { max: 1, onnotice: () => {} })
  t.teardown(async () => { await locker.end({ timeout: 1 }) })
  await locker.begin(async tx => {
    await tx.unsafe('lock table audit_log in access exclusive mode')
    const started = performance.now()
    await gw.app.close()
    const took = performance.now() - started
    // Unbounded, close would wait for the lock forever; the margin is for a loaded machine.
    t.ok(took >= 250 && took < 10_000, `close bounded (${Math.round(took)} ms)`)
  })
  const unwritten = gw.logs.filter(l => l.includes('"msg":"unwritten audit row"'))
  t.equal(unwritten.length, 2, gw.logs.filter(l => l.includes('audit')).join(''))
  t.ok(unwritten.some(l => l.includes(String(res.headers['x-request-id']))), 'the log names the request')
  t.ok(gw.logs.some(l => l.includes('could not be written before shutdown')))
})

t.test('audit rows are append-only: UPDATE, DELETE and TRUNCATE are refused; only the retention job deletes, and only old rows', async t => {
  const gw = await startGateway(t, { env: { AUDIT_FLUSH_INTERVAL_MS: '5' } })
  await ready(gw, 'ws-append')
  await gw.app.close()
  const sql = gw.db.sql
  t.equal((await rows(gw)).length, 1)
  await t.rejects(sql`update audit_log set status = 500`, { code: '42501', message: /append-only: UPDATE refused/ })
  await t.rejects(sql`delete from audit_log`, { code: '42501', message: /append-only: DELETE refused/ })
  await t.rejects(sql`truncate audit_log`, { code: '42501', message: /append-only: TRUNCATE refused/ })
  // The setting alone does not open the table: the row is younger than a day.
  await t.rejects(sql.begin(async tx => {
    await tx`select set_config('ehr_gateway.audit_retention', 'on', true)`
    await tx`delete from audit_log`
  }), { code: '42501' })
  // Nor does it outlive its transaction.
  await t.rejects(sql`update audit_log set at = at - interval '7 years'`, { code: '42501' })

  const repo = auditRepository(sql)
  const old = { ...(await rows(gw))[0] as AuditEntry, requestId: '00000000-0000-4000-8000-000000000001', at: new Date(Date.now() - 7 * 365 * 86_400_000) }
  const { id: _id, ...record } = old
  t.equal(await repo.insertBatch([record]), 1)
  t.equal(await repo.insertBatch([record]), 0, 'the same request id twice is one row (a retried batch)')
  t.equal(await repo.prune(6 * 365.25 * 86_400_000), 1, 'the retention job deletes the old row')
  t.equal((await rows(gw)).length, 1, 'and only that one')
  await t.rejects(repo.prune(3_600_000), { code: 'AUDIT_RETENTION_TOO_SHORT' }, 'prune refuses to delete rows younger than a day')
})

// The GRANTs the README gives: the gateway's role may add and read rows, never remove them,
// even if it sets the retention switch; the retention role may delete old rows only.
t.test('with the documented GRANTs the gateway role cannot delete audit rows', async t => {
  const gw = await startGateway(t, { env: { AUDIT_FLUSH_INTERVAL_MS: '5' } })
  await ready(gw, 'ws-grants')
  await gw.app.close()
  const suffix = dbName(gw).slice(-12)
  const gatewayRole = `ehrgw_gateway_${suffix}`
  const retentionRole = `ehrgw_retention_${suffix}`
  const sql = gw.db.sql
  const cluster = admin(t)
  // With passwords: the embedded Postgres (no DATABASE_URL) asks for one; a trust server ignores it.
  const password = randomBytes(16).toString('hex')
  await cluster.unsafe(`create role ${gatewayRole} login password '${password}'; create role ${retentionRole} login password '${password}'`)
  t.teardown(async () => {
    await sql.unsafe(`drop owned by ${gatewayRole}, ${retentionRole}`)
    await cluster.unsafe(`drop role if exists ${gatewayRole}; drop role if exists ${retentionRole}`)
  })
  await sql.unsafe(`
    revoke all on audit_log from public;
    grant insert, select on audit_log to ${gatewayRole};
    grant select, delete on audit_log to ${retentionRole};`)
  const as = (role: string) => {
    const url = new URL(gw.db.url)
    url.username = role
    url.password = password
    const client = postgres(url.toString(), { max: 1, onnotice: () => {}, transform: postgres.camel, fetch_types: false })
    t.teardown(async () => { await client.end({ timeout: 1 }) })
    return client
  }
  const gateway = as(gatewayRole)
  const [row] = await rows(gw)
  const { id: _id, ...record } = row as AuditEntry
  t.equal(await auditRepository(gateway).insertBatch([{ ...record, requestId: '00000000-0000-4000-8000-0000000000aa', at: new Date(Date.now() - 7 * 365 * 86_400_000) }]), 1, 'the gateway role inserts')
  t.equal((await auditRepository(gateway).list({}, 10)).length, 2, 'and reads')
  await t.rejects(auditRepository(gateway).prune(86_400_000), { code: '42501', message: /permission denied/ }, 'but cannot prune')
  await t.rejects(gateway`update audit_log set status = 1`, { code: '42501' })
  t.equal(await auditRepository(as(retentionRole)).prune(86_400_000 * 365), 1, 'the retention role prunes the old row')
})

t.test('a client that leaves before the answer still leaves one row (499)', async t => {
  const gw = await startGateway(t, { env: { AUDIT_FLUSH_INTERVAL_MS: '5' } })
  const { agent, auth } = await ready(gw, 'ws-leaves')
  let release = (): void => {}
  gw.upstream.setHandler(async (_req, res) => {
    await new Promise<void>(resolve => { release = resolve })
    res.writeHead(200, { 'content-type': 'application/fhir+json' })
    res.end('{}')
  })
  const abort = new AbortController()
  const pending = request(`${gw.url}/fhir/Patient/slow`, { dispatcher: agent, headers: auth, signal: abort.signal })
  // Leave once the request has reached the EHR.
  for (let i = 0; i < 200 && !gw.upstream.requests.some(r => r.url.includes('/Patient/slow')); i++) await sleep(10)
  abort.abort()
  await t.rejects(pending)
  // The abort row (after the token's) is written while the EHR is still thinking.
  const written = async (): Promise<number> => (await gw.app.gateway.metrics.auditRowsWritten.get()).values[0]?.value ?? 0
  for (let i = 0; i < 200 && await written() < 2; i++) await sleep(10)
  t.equal(await written(), 2)
  release()
  await gw.app.close()
  const all = await rows(gw)
  const left = all.filter(r => r.path === '/fhir/Patient/slow')
  t.equal(left.length, 1, 'exactly one row')
  t.match(left[0], { status: 499, errorCode: 'CLIENT_CLOSED_REQUEST', machineName: 'ws-leaves', resourceId: 'slow' })
})

// Review finding: a POST whose body was read, its answer cut mid-stream, fired neither
// onResponse nor onRequestAbort, so the EHR served (or changed) data with no row.
t.test('an answer cut mid-body after the request body was read still leaves one row', async t => {
  const gw = await startGateway(t, { env: { AUDIT_FLUSH_INTERVAL_MS: '5' } })
  const { agent, auth } = await ready(gw, 'ws-cut')
  gw.upstream.setHandler(async (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/fhir+json' })
    res.write('{"resourceType":"Bundle","entry":[' + ' '.repeat(64 * 1024))
    await sleep(50)
    res.destroy()
  })
  const res = await request(`${gw.url}/fhir/Patient/_search`, {
    dispatcher: agent, method: 'POST', headers: { ...auth, 'content-type': 'application/x-www-form-urlencoded' }, body: 'name=Jane'
  })
  t.equal(res.statusCode, 200, 'the headers and part of the body went out')
  await t.rejects(res.body.text(), 'then the body was cut')
  await gw.app.close()
  const cut = (await rows(gw)).filter(r => r.path === '/fhir/Patient/_search')
  t.equal(cut.length, 1, 'exactly one row')
  // The EHR broke the answer off, not the client: the row must not blame the workstation.
  t.match(cut[0], { method: 'POST', status: 200, errorCode: 'UPSTREAM_ERROR', machineName: 'ws-cut', queryParams: [] })
})
