import t from 'tap'
import type { Test } from 'tap'
import type { Agent } from 'undici'
import { startGateway } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'
import { assertProblem } from '../helpers/assert.js'

type Response = Awaited<ReturnType<TestGateway['call']>>


function assertRateLimited (t: Test, res: Response, todo?: string): void {
  assertProblem(t, res, 429, 'RATE_LIMITED', todo)
  const retryAfter = Number(res.headers['retry-after'])
  t.ok(Number.isInteger(retryAfter) && retryAfter > 0 && retryAfter <= 60, `Retry-After is a positive number of seconds (${String(res.headers['retry-after'])})`, todo === undefined ? {} : { todo })
}

const bearer = (token: string): Record<string, string> => ({ authorization: `Bearer ${token}` })

interface Client { readonly agent: Agent, readonly token: string }

async function machine (gw: TestGateway, name: string): Promise<Client> {
  const { pair } = await gw.register(name)
  const agent = gw.agent(pair)
  return { agent, token: await gw.fetchToken(agent) }
}

t.test('the limit is per machine, not per address', async t => {
  // One budget per machine covers its token request and its proxied calls: 1 + 3 = 4.
  const gw = await startGateway(t, { env: { RATE_LIMIT_MAX: '4' } })
  const a = await machine(gw, 'ws-a')
  const b = await machine(gw, 'ws-b')

  for (let i = 1; i <= 3; i++) {
    const res = await gw.call(a.agent, `/fhir/Patient/${i}`, { headers: bearer(a.token) })
    t.equal(res.status, 200, `request ${i} of A is allowed`)
  }
  const limited = await gw.call(a.agent, '/fhir/Patient/4', { headers: bearer(a.token) })
  assertRateLimited(t, limited)
  t.equal(gw.upstream.requests.length, 3, 'the refused request never reached the upstream')
  assertRateLimited(t, await gw.call(a.agent, '/fhir/Patient/5', { method: 'POST', headers: { ...bearer(a.token), 'content-type': 'application/fhir+json' }, body: '{}' }))

  // B connects from the same 127.0.0.1 and has a budget of its own
  for (let i = 1; i <= 3; i++) {
    const res = await gw.call(b.agent, `/fhir/Patient/${i}`, { headers: bearer(b.token) })
    t.equal(res.status, 200, `request ${i} of B is allowed`)
  }
  assertRateLimited(t, await gw.call(b.agent, '/fhir/Patient/4', { headers: bearer(b.token) }))
  t.equal(gw.upstream.requests.length, 6)
})

// `<PROXY_PREFIX>` itself is a proxied path too (a FHIR batch/transaction is POST [base]).
t.test('the base path and the resource paths share one budget', async t => {
  const gw = await startGateway(t, { env: { RATE_LIMIT_MAX: '4' } })
  const a = await machine(gw, 'ws-a')
  for (let i = 1; i <= 3; i++) {
    t.equal((await gw.call(a.agent, `/fhir/Patient/${i}`, { headers: bearer(a.token) })).status, 200)
  }
  const res = await gw.call(a.agent, '/fhir', { method: 'POST', headers: { ...bearer(a.token), 'content-type': 'application/fhir+json' }, body: '{"resourceType":"Bundle","type":"batch"}' })
  assertRateLimited(t, res)
  t.equal(gw.upstream.requests.length, 3, 'the fourth proxied request never reached the upstream')
})

// Review finding: limits counted only requests that passed authentication, so failed
// attempts (each costing a signature check) were unlimited.
t.test('refused requests count against the limit of the certificate that sent them', async t => {
  const gw = await startGateway(t, { env: { RATE_LIMIT_MAX: '4' } })
  const a = await machine(gw, 'ws-a') // 1: the token request
  for (let i = 0; i < 3; i++) {
    assertProblem(t, await gw.call(a.agent, '/fhir/Patient/1', { headers: bearer(a.token + 'x') }), 401, 'TOKEN_INVALID')
  }
  assertRateLimited(t, await gw.call(a.agent, '/fhir/Patient/1', { headers: bearer(a.token) }))
  t.equal(gw.upstream.requests.length, 0)
})
