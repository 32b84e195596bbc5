import t from 'tap'
import type { Test } from 'tap'
import { startGateway } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'
import { assertProblem } from '../helpers/assert.js'

const FRONTEND = 'https://frontend.hospital.internal'
const OTHER = 'https://frontend.hospital.internal:8444'

type Response = Awaited<ReturnType<TestGateway['call']>>

function corsHeaders (res: Response): string[] {
  return Object.keys(res.headers).filter(h => h.startsWith('access-control-'))
}

const preflight = (origin: string, method: string, headers = 'authorization, content-type, dpop'): Record<string, string> => ({
  origin, 'access-control-request-method': method, 'access-control-request-headers': headers
})

function list (res: Response, name: string): string[] {
  return String(res.headers[name] ?? '').split(',').map(s => s.trim().toLowerCase())
}

t.test('CORS_ORIGINS: credentialed CORS for the listed origins only', async t => {
  const gw = await startGateway(t, { env: { CORS_ORIGINS: `${FRONTEND}, http://localhost:5173` } })
  const { pair } = await gw.register('ws-cors')
  const workstation = gw.agent(pair)
  const anonymous = gw.agent() // browsers send no client certificate or token on a preflight

  await t.test('preflight from an allowed origin: 204 without certificate or token, never proxied', async t => {
    for (const [path, method] of [['/v1/token', 'POST'], ['/fhir/Patient/1', 'PUT'], ['/fhir', 'POST']] as const) {
      const res = await gw.call(anonymous, path, { method: 'OPTIONS', headers: preflight(FRONTEND, method) })
      t.equal(res.status, 204, `${path}: ${res.text}`)
      t.equal(res.headers['access-control-allow-origin'], FRONTEND)
      t.equal(res.headers['access-control-allow-credentials'], 'true')
      t.ok(list(res, 'access-control-allow-methods').includes(method.toLowerCase()))
      for (const h of ['authorization', 'dpop', 'content-type']) t.ok(list(res, 'access-control-allow-headers').includes(h), `${h} allowed`)
      t.ok(Number(res.headers['access-control-max-age']) > 0)
      t.ok(list(res, 'vary').includes('origin'), 'Vary: Origin')
      t.equal(res.headers['strict-transport-security'], 'max-age=31536000; includeSubDomains', 'security headers on the preflight too')
    }
    t.equal(gw.upstream.requests.length, 0, 'no preflight reached the EHR')
    const local = await gw.call(anonymous, '/v1/token', { method: 'OPTIONS', headers: preflight('http://localhost:5173', 'POST') })
    t.equal(local.headers['access-control-allow-origin'], 'http://localhost:5173')
  })

  await t.test('a disallowed origin gets no CORS header at all', async t => {
    for (const origin of [OTHER, 'https://evil.example', 'null', FRONTEND.toUpperCase(), `${FRONTEND}.evil.example`]) {
      const res = await gw.call(anonymous, '/fhir/Patient/1', { method: 'OPTIONS', headers: preflight(origin, 'GET') })
      t.same(corsHeaders(res), [], `${origin}: none`)
      t.not(res.status, 204)
      assertProblem(t, res, 401, 'CLIENT_CERT_REQUIRED')
    }
    const token = await gw.fetchToken(workstation)
    const actual = await gw.call(workstation, '/fhir/Patient/1', { headers: { origin: 'https://evil.example', authorization: `Bearer ${token}` } })
    t.equal(actual.status, 200, 'the request itself is not the gateway\'s to refuse; the browser will not expose it')
    t.same(corsHeaders(actual), [])
  })

  await t.test('actual credentialed requests carry Allow-Origin, Allow-Credentials and the exposed headers', async t => {
    const tokenRes = await gw.call(workstation, '/v1/token', { method: 'POST', headers: { origin: FRONTEND } })
    t.equal(tokenRes.status, 200)
    assertCorsAnswer(t, tokenRes)
    const token = tokenRes.json()['access_token'] as string
    const res = await gw.call(workstation, '/fhir/Patient/1', { headers: { origin: FRONTEND, authorization: `Bearer ${token}` } })
    t.equal(res.status, 200)
    assertCorsAnswer(t, res)
    for (const h of ['www-authenticate', 'dpop-nonce', 'retry-after', 'x-ratelimit-remaining', 'location']) {
      t.ok(list(res, 'access-control-expose-headers').includes(h), `${h} exposed`)
    }
    t.equal(gw.upstream.requests.at(-1)?.headers['origin'], FRONTEND, 'Origin itself is passed on (the EHR may log it)')
    // refusals are readable by the frontend too, so it can react to TOKEN_EXPIRED and the like
    const refused = await gw.call(workstation, '/fhir/Patient/1', { headers: { origin: FRONTEND, authorization: `Bearer ${token}x` } })
    assertProblem(t, refused, 401, 'TOKEN_INVALID')
    assertCorsAnswer(t, refused)
  })

  await t.test('an OPTIONS without Access-Control-Request-Method is an ordinary request', async t => {
    const token = await gw.fetchToken(workstation)
    const before = gw.upstream.requests.length
    const res = await gw.call(workstation, '/fhir/metadata', { method: 'OPTIONS', headers: { origin: FRONTEND, authorization: `Bearer ${token}` } })
    t.equal(res.status, 200, res.text)
    t.equal(gw.upstream.requests.length, before + 1, 'proxied like any FHIR call')
    assertCorsAnswer(t, res)
    assertProblem(t, await gw.call(anonymous, '/fhir/metadata', { method: 'OPTIONS', headers: { origin: FRONTEND } }), 401, 'CLIENT_CERT_REQUIRED')
  })
})

t.test('without CORS_ORIGINS there is no CORS', async t => {
  const gw = await startGateway(t)
  const res = await gw.call(gw.agent(), '/v1/token', { method: 'OPTIONS', headers: preflight(FRONTEND, 'POST') })
  t.same(corsHeaders(res), [])
  assertProblem(t, res, 404, 'NOT_FOUND')
  t.equal(res.headers['cross-origin-resource-policy'], 'same-origin')
})

function assertCorsAnswer (t: Test, res: Response): void {
  t.equal(res.headers['access-control-allow-origin'], FRONTEND, 'Allow-Origin names the origin')
  t.equal(res.headers['access-control-allow-credentials'], 'true', 'credentials allowed')
  t.ok(list(res, 'vary').includes('origin'), 'Vary: Origin')
}
