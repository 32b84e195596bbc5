import t from 'tap'
import type { Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import type { JWK } from 'jose'
import { Agent } from 'undici'
import { createDevCa } from '../../gateway/demo/pki.js'
import { machinesRepository } from '../../shared/db/machines.js'
import { startGateway } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'
import { assertProblem } from '../helpers/assert.js'

type Response = Awaited<ReturnType<TestGateway['call']>>

const DAY_MS = 24 * 60 * 60 * 1000


const bearer = (token: string): Record<string, string> => ({ authorization: `Bearer ${token}` })

// Both guarded entry points: the token endpoint and the proxy (with and without a token).
async function assertRefusedEverywhere (t: Test, gw: TestGateway, agent: Agent, status: number, code: string, token?: string): Promise<void> {
  assertProblem(t, await gw.call(agent, '/v1/token', { method: 'POST' }), status, code)
  assertProblem(t, await gw.call(agent, '/fhir/Patient/1'), status, code)
  if (token !== undefined) assertProblem(t, await gw.call(agent, '/fhir/Patient/1', { headers: bearer(token) }), status, code)
}

// Polls every 20 ms until `done` holds; returns the elapsed milliseconds (capped at 3 s).
async function elapsedUntil (done: () => Promise<boolean>): Promise<number> {
  const started = performance.now()
  while (!(await done())) {
    if (performance.now() - started > 3000) break
    await sleep(20)
  }
  return performance.now() - started
}

t.test('certificate checks at the HTTP layer', async t => {
  const gw = await startGateway(t)

  await t.test('no client certificate: 401 CLIENT_CERT_REQUIRED', async t => {
    await assertRefusedEverywhere(t, gw, gw.agent(), 401, 'CLIENT_CERT_REQUIRED', 'a.b.c')
    const res = await gw.call(gw.agent(), '/fhir', { method: 'POST', body: '{}' })
    assertProblem(t, res, 401, 'CLIENT_CERT_REQUIRED')
  })

  await t.test('a certificate of a foreign CA (even one with the same name), registered or not: 401 CLIENT_CERT_UNTRUSTED', async t => {
    const sameName = await createDevCa()
    const other = await createDevCa({ commonName: 'some other CA' })
    for (const ca of [sameName, other]) {
      const pair = await ca.issueClient({ commonName: 'ws-foreign' })
      await assertRefusedEverywhere(t, gw, gw.agent(pair), 401, 'CLIENT_CERT_UNTRUSTED')
    }
    const registered = await gw.register('ws-foreign', await sameName.issueClient({ commonName: 'ws-foreign' }))
    await assertRefusedEverywhere(t, gw, gw.agent(registered.pair), 401, 'CLIENT_CERT_UNTRUSTED')
  })

  await t.test('an expired or not yet valid certificate of the right CA, even registered: 401 CLIENT_CERT_UNTRUSTED', async t => {
    const now = Date.now()
    const expired = await gw.pki.ca.issueClient({ commonName: 'ws-old', notBefore: new Date(now - 10 * DAY_MS), notAfter: new Date(now - DAY_MS) })
    await assertRefusedEverywhere(t, gw, gw.agent(expired), 401, 'CLIENT_CERT_UNTRUSTED')
    await gw.register('ws-old', expired)
    await assertRefusedEverywhere(t, gw, gw.agent(expired), 401, 'CLIENT_CERT_UNTRUSTED')
    const early = await gw.pki.ca.issueClient({ commonName: 'ws-early', notBefore: new Date(now + DAY_MS), notAfter: new Date(now + 10 * DAY_MS) })
    await gw.register('ws-early', early)
    await assertRefusedEverywhere(t, gw, gw.agent(early), 401, 'CLIENT_CERT_UNTRUSTED')
  })

  await t.test('a server-only certificate of the right CA, registered: 401 CLIENT_CERT_UNTRUSTED', async t => {
    const server = await gw.pki.ca.issueServer({ commonName: 'ws-server' })
    await gw.register('ws-server', server)
    await assertRefusedEverywhere(t, gw, gw.agent(server), 401, 'CLIENT_CERT_UNTRUSTED')
  })

  await t.test('a valid but unregistered certificate: 403 MACHINE_NOT_REGISTERED', async t => {
    const pair = await gw.pki.ca.issueClient({ commonName: 'ws-unknown' })
    await assertRefusedEverywhere(t, gw, gw.agent(pair), 403, 'MACHINE_NOT_REGISTERED')
  })

  t.equal(gw.upstream.requests.length, 0, 'nothing reached the upstream')
})

t.test('discovery endpoints need no client certificate and leak no private key', async t => {
  const gw = await startGateway(t)
  const anonymous = gw.agent()
  const jwks = await gw.call(anonymous, '/.well-known/jwks.json')
  t.equal(jwks.status, 200, jwks.text)
  t.match(String(jwks.headers['content-type']), /^application\/json/)
  const keys = jwks.json()['keys'] as JWK[]
  t.ok(keys.length >= 1)
  for (const key of keys) {
    t.type(key.kid, 'string')
    t.equal(key.use, 'sig')
    for (const secret of ['d', 'p', 'q', 'dp', 'dq', 'qi', 'k']) t.notOk(secret in key, `no private member ${secret}`)
  }
  const meta = await gw.call(anonymous, '/.well-known/oauth-authorization-server')
  t.equal(meta.status, 200, meta.text)
  const body = meta.json()
  t.equal(body['issuer'], gw.config.tokens.issuer)
  t.equal(body['token_endpoint'], `${gw.config.tokens.issuer}/v1/token`)
  t.equal(body['jwks_uri'], `${gw.config.tokens.issuer}/.well-known/jwks.json`)
  t.same(body['grant_types_supported'], ['client_credentials'])
  t.same(body['token_endpoint_auth_methods_supported'], ['tls_client_auth'])
  t.equal(body['tls_client_certificate_bound_access_tokens'], true)
  // and with a foreign certificate too: the public endpoints do not care
  const foreign = await (await createDevCa()).issueClient({ commonName: 'x' })
  t.equal((await gw.call(gw.agent(foreign), '/.well-known/jwks.json')).status, 200)
})

t.test('revocation reaches an open keep-alive connection with a live token within a second', async t => {
  const gw = await startGateway(t)
  const { pair } = await gw.register('ws-01')
  let handshakes = 0
  gw.app.server.on('secureConnection', () => { handshakes++ })
  // One connection per origin, so every request below rides the same TLS session.
  const agent = new Agent({ connections: 1, connect: { ca: gw.pki.ca.cert, cert: pair.cert, key: pair.key } })
  t.teardown(async () => { await agent.close() })
  const token = await gw.fetchToken(agent)
  const before = await gw.call(agent, '/fhir/Patient/1', { headers: bearer(token) })
  t.equal(before.status, 200, before.text)

  await machinesRepository(gw.db.sql).revoke('ws-01', 'lost')
  let last: Response | undefined
  const elapsed = await elapsedUntil(async () => {
    last = await gw.call(agent, '/fhir/Patient/1', { headers: bearer(token) })
    return last.status !== 200
  })
  t.ok(elapsed < 1000, `refused after ${Math.round(elapsed)} ms`)
  if (last !== undefined) assertProblem(t, last, 403, 'MACHINE_REVOKED')
  await assertRefusedEverywhere(t, gw, agent, 403, 'MACHINE_REVOKED', token)
  t.equal(handshakes, 1, 'all of it on the one keep-alive connection')
  const proxied = gw.upstream.requests.length
  assertProblem(t, await gw.call(agent, '/fhir/Patient/1', { headers: bearer(token) }), 403, 'MACHINE_REVOKED')
  t.equal(gw.upstream.requests.length, proxied, 'nothing more reached the upstream')
})

t.test('a revocation is seen by a second gateway instance on the same database within a second', async t => {
  const gw1 = await startGateway(t)
  const gw2 = await startGateway(t, { db: gw1.db, pki: gw1.pki })
  const { pair } = await gw1.register('ws-01')
  const agent1 = gw1.agent(pair)
  const agent2 = gw2.agent(pair)
  const token1 = await gw1.fetchToken(agent1)
  const token2 = await gw2.fetchToken(agent2)
  t.equal((await gw1.call(agent1, '/fhir/Patient/1', { headers: bearer(token1) })).status, 200)
  t.equal((await gw2.call(agent2, '/fhir/Patient/1', { headers: bearer(token2) })).status, 200)
  // the instances share the signing keys, so each accepts the other's token
  t.equal((await gw2.call(agent2, '/fhir/Patient/1', { headers: bearer(token1) })).status, 200)

  await machinesRepository(gw1.db.sql).revoke('ws-01', 'lost')
  let last: Response | undefined
  const elapsed = await elapsedUntil(async () => {
    last = await gw2.call(agent2, '/fhir/Patient/1', { headers: bearer(token2) })
    return last.status !== 200
  })
  t.ok(elapsed < 1000, `second instance refused after ${Math.round(elapsed)} ms`)
  if (last !== undefined) assertProblem(t, last, 403, 'MACHINE_REVOKED')
  await assertRefusedEverywhere(t, gw2, agent2, 403, 'MACHINE_REVOKED', token1)
  await assertRefusedEverywhere(t, gw1, agent1, 403, 'MACHINE_REVOKED', token1)
})

t.test('registering a machine after a cached "not registered" answer takes effect at once', async t => {
  const gw = await startGateway(t)
  const pair = await gw.pki.ca.issueClient({ commonName: 'ws-new' })
  const agent = gw.agent(pair)
  assertProblem(t, await gw.call(agent, '/v1/token', { method: 'POST' }), 403, 'MACHINE_NOT_REGISTERED')
  assertProblem(t, await gw.call(agent, '/v1/token', { method: 'POST' }), 403, 'MACHINE_NOT_REGISTERED')
  t.ok(gw.app.gateway.registry.stats.hits >= 1, 'the negative answer was cached')
  await gw.register('ws-new', pair)
  let status = 0
  const elapsed = await elapsedUntil(async () => {
    status = (await gw.call(agent, '/v1/token', { method: 'POST' })).status
    return status === 200
  })
  t.equal(status, 200)
  t.ok(elapsed < 1000, `admitted after ${Math.round(elapsed)} ms, long before the ${gw.config.registry.cacheTtlMs} ms TTL`)
  const token = await gw.fetchToken(agent)
  t.equal((await gw.call(agent, '/fhir/Patient/1', { headers: bearer(token) })).status, 200)
})

t.test('a revoked certificate stays refused when the name is registered again with a new one', async t => {
  const gw = await startGateway(t)
  const old = await gw.register('ws-01')
  const oldAgent = gw.agent(old.pair)
  const oldToken = await gw.fetchToken(oldAgent)
  await machinesRepository(gw.db.sql).revoke('ws-01', 'replaced')
  const fresh = await gw.register('ws-01')
  const freshAgent = gw.agent(fresh.pair)
  const freshToken = await gw.fetchToken(freshAgent)
  t.equal((await gw.call(freshAgent, '/fhir/Patient/1', { headers: bearer(freshToken) })).status, 200)
  let last: Response | undefined
  await elapsedUntil(async () => {
    last = await gw.call(oldAgent, '/fhir/Patient/1', { headers: bearer(oldToken) })
    return last.status !== 200
  })
  if (last !== undefined) assertProblem(t, last, 403, 'MACHINE_REVOKED')
  await assertRefusedEverywhere(t, gw, oldAgent, 403, 'MACHINE_REVOKED', freshToken)
  // the old token does not carry over to the new certificate of the same name
  assertProblem(t, await gw.call(freshAgent, '/fhir/Patient/1', { headers: bearer(oldToken) }), 401, 'TOKEN_WRONG_MACHINE')
})
