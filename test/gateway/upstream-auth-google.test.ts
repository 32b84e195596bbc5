import t from 'tap'
import { generateKeyPairSync, randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { decodeProtectedHeader, jwtVerify } from 'jose'
import { startGateway, TEST_API_KEY } from '../helpers/gateway.js'
import { proxyClient as client, tokenServer, tokenFor, waitFor } from '../helpers/token-server.js'

const CLIENT_SECRET = 'GOCSPX-' + randomBytes(12).toString('hex')
const REFRESH_TOKEN = '1//refresh-' + randomBytes(12).toString('hex')
const CLIENT_ID = '123-abc.apps.googleusercontent.com'

t.test('Google OAuth2 client: refresh grant, cached, refreshed ahead of expiry, API key and quota project added', async t => {
  const server = await tokenServer(t, 'ya29.oauth')
  const gw = await startGateway(t, {
    env: {
      GOOGLE_OAUTH_CLIENT_ID: CLIENT_ID,
      GOOGLE_OAUTH_CLIENT_SECRET: CLIENT_SECRET,
      GOOGLE_OAUTH_REFRESH_TOKEN: REFRESH_TOKEN,
      GOOGLE_TOKEN_URL: server.url,
      GOOGLE_QUOTA_PROJECT: 'hospital-billing-1',
      RATE_LIMIT_MAX: '100000'
    }
  })
  const call = await client(gw)

  const first = await call('/fhir/Patient/1', { headers: { 'x-goog-user-project': 'attacker-project' } })
  t.equal(first.status, 200, first.text)
  t.equal(server.requests.length, 1, 'one token fetch')
  const grant = server.requests[0]
  t.equal(grant?.method, 'POST')
  t.equal(grant?.url, '/oauth2/token', 'GOOGLE_TOKEN_URL replaced the Google endpoint')
  t.same(grant?.form, { refresh_token: REFRESH_TOKEN, client_id: CLIENT_ID, client_secret: CLIENT_SECRET, grant_type: 'refresh_token' }, 'RFC 6749 §6 refresh grant')
  const seen = gw.upstream.requests.at(-1)
  t.equal(seen?.headers.authorization, `Bearer ${tokenFor('ya29.oauth', 1)}`, "the upstream gets the gateway's token, never the client's")
  t.equal(seen?.headers['x-goog-user-project'], 'hospital-billing-1', 'quota project from config, not from the client')
  t.equal(seen?.headers['x-api-key'], TEST_API_KEY, 'API key combined with the token source')

  const started = performance.now()
  for (let i = 0; i < 999; i++) {
    const res = await call()
    if (res.status !== 200) t.fail(`request ${i}: ${res.status}`)
  }
  const perRequestMs = (performance.now() - started) / 999
  t.equal(server.requests.length, 1, `1,000 requests, one token fetch (${perRequestMs.toFixed(2)} ms per request)`)
  t.ok(gw.upstream.requests.slice(-999).every(r => r.headers.authorization === `Bearer ${tokenFor('ya29.oauth', 1)}`))

  // 3600 s token: refresh once less than max(60 s, 360 s) is left, in the background.
  gw.clock.advance(3300_000)
  t.equal((await call()).status, 200)
  t.equal(gw.upstream.requests.at(-1)?.headers.authorization, `Bearer ${tokenFor('ya29.oauth', 1)}`, 'the still-valid token serves while refreshing')
  await waitFor(t, 'a background refresh', () => server.requests.length === 2)
  await new Promise(resolve => setTimeout(resolve, 20))
  t.equal((await call()).status, 200)
  t.equal(gw.upstream.requests.at(-1)?.headers.authorization, `Bearer ${tokenFor('ya29.oauth', 2)}`, 'then the new one')

  // A failed background refresh keeps the valid token in use.
  server.setHandler((_req, res) => { res.writeHead(500).end('{}') })
  gw.clock.advance(3300_000)
  t.equal((await call()).status, 200)
  await waitFor(t, 'the refresh was tried', () => server.requests.length === 3)
  // Long enough for gaxios' own retry (100 ms on) to show, were it not switched off.
  await new Promise(resolve => setTimeout(resolve, 400))
  t.equal((await call()).status, 200, 'still served by the old token')
  t.equal(gw.upstream.requests.at(-1)?.headers.authorization, `Bearer ${tokenFor('ya29.oauth', 2)}`)
  t.equal(server.requests.length, 3, 'no retry inside the back-off')

  // Past expiry with the endpoint back: the next request waits for a fresh token.
  server.issue()
  gw.clock.advance(3600_000)
  t.equal((await call()).status, 200)
  t.equal(server.requests.length, 4)
  t.match(gw.upstream.requests.at(-1)?.headers.authorization, /^Bearer ya29\.oauth-\d+$/)

  const metrics = await gw.app.gateway.metrics.registry.metrics()
  t.match(metrics, /ehr_gateway_upstream_token_fetches_total\{mode="google-oauth",result="ok"\} 3/)
  t.match(metrics, /ehr_gateway_upstream_token_fetches_total\{mode="google-oauth",result="error"\} 1/)

  const logs = gw.logs.join('')
  for (const secret of [CLIENT_SECRET, REFRESH_TOKEN, tokenFor('ya29.oauth', 1), tokenFor('ya29.oauth', 2), TEST_API_KEY]) {
    t.notOk(logs.includes(secret), 'no client secret, refresh token, access token or API key in the logs')
  }
  t.match(logs, /upstream token fetch failed/)
})

t.test('upstream 401: one forced refresh and one retry for idempotent requests without a body', async t => {
  const server = await tokenServer(t, 'ya29.retry')
  const gw = await startGateway(t, {
    env: { GOOGLE_OAUTH_CLIENT_ID: CLIENT_ID, GOOGLE_OAUTH_CLIENT_SECRET: CLIENT_SECRET, GOOGLE_OAUTH_REFRESH_TOKEN: REFRESH_TOKEN, GOOGLE_TOKEN_URL: server.url }
  })
  const call = await client(gw)
  t.equal((await call()).status, 200)
  // The upstream revokes token 1 early.
  const revoked = new Set([`Bearer ${tokenFor('ya29.retry', 1)}`])
  gw.upstream.setHandler((req, res) => {
    if (revoked.has(String(req.headers.authorization))) {
      res.writeHead(401, { 'www-authenticate': 'Bearer error="invalid_token"' }).end()
      return
    }
    res.writeHead(200, { 'content-type': 'application/fhir+json' }).end(JSON.stringify({ resourceType: 'Patient', auth: req.headers.authorization }))
  })
  const before = gw.upstream.requests.length
  const res = await call()
  t.equal(res.status, 200, 'retried with a fresh token')
  t.equal(server.requests.length, 2, 'one forced refresh')
  t.equal(gw.upstream.requests.length - before, 2, 'one retry')
  t.equal(gw.upstream.requests.at(-1)?.headers.authorization, `Bearer ${tokenFor('ya29.retry', 2)}`)

  revoked.add(`Bearer ${tokenFor('ya29.retry', 2)}`)
  const post = await call('/fhir/Patient', { method: 'POST', body: '{"resourceType":"Patient"}', headers: { 'content-type': 'application/fhir+json' } })
  t.equal(post.status, 502, 'a POST is never repeated')
  t.match(post.text, /UPSTREAM_AUTH_FAILED/)
  t.equal(server.requests.length, 2, 'and no refresh for it')

  // Every token refused: one refresh, one retry, then the coded 502.
  gw.upstream.setHandler((_req, res) => { res.writeHead(401).end() })
  const n = gw.upstream.requests.length
  const refused = await call('/fhir/Patient/1', { method: 'DELETE' })
  t.equal(refused.status, 502)
  t.match(refused.text, /UPSTREAM_AUTH_FAILED/)
  t.equal(gw.upstream.requests.length - n, 2, 'exactly one retry')
  t.equal(server.requests.length, 3)
})

t.test('Google service account: JWT-bearer assertion signed with the key file, GOOGLE_TOKEN_URL overrides token_uri', async t => {
  const server = await tokenServer(t, 'ya29.sa')
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
  const dir = t.testdir()
  const keyFile = join(dir, 'sa.json')
  const email = 'ehr-gateway@hospital-project.iam.gserviceaccount.com'
  await writeFile(keyFile, JSON.stringify({
    type: 'service_account',
    project_id: 'hospital-project',
    private_key_id: 'key-id-1',
    private_key: privateKey.export({ type: 'pkcs8', format: 'pem' }),
    client_email: email,
    client_id: '1234567890',
    // Ignored by the library; GOOGLE_TOKEN_URL is what redirects.
    token_uri: 'https://oauth2.invalid/token'
  }))
  const gw = await startGateway(t, {
    env: { GOOGLE_APPLICATION_CREDENTIALS: keyFile, GOOGLE_TOKEN_URL: server.url, EHR_API_KEY: '' }
  })
  const call = await client(gw)
  const res = await call()
  t.equal(res.status, 200, res.text)
  t.equal(server.requests.length, 1)
  const form = server.requests[0]?.form ?? {}
  t.equal(form['grant_type'], 'urn:ietf:params:oauth:grant-type:jwt-bearer', 'RFC 7523 §2.1 grant')
  const assertion = form['assertion'] ?? ''
  t.equal(decodeProtectedHeader(assertion).alg, 'RS256')
  const { payload } = await jwtVerify(assertion, publicKey, { algorithms: ['RS256'] })
  t.equal(payload.iss, email)
  t.equal(payload['scope'], 'https://www.googleapis.com/auth/cloud-healthcare')
  t.equal(payload.aud, 'https://oauth2.googleapis.com/token', "aud stays Google's token URL, as Google checks it")
  t.ok(typeof payload.exp === 'number' && typeof payload.iat === 'number' && payload.exp - payload.iat <= 3600, 'an hour at most')
  const seen = gw.upstream.requests.at(-1)
  t.equal(seen?.headers.authorization, `Bearer ${tokenFor('ya29.sa', 1)}`)
  t.equal(seen?.headers['x-api-key'], undefined, 'no API key configured, none sent')
  t.equal(seen?.headers['x-goog-user-project'], undefined, 'no quota project unless configured')

  for (let i = 0; i < 50; i++) await call()
  t.equal(server.requests.length, 1, 'cached')
  t.notOk(gw.logs.join('').includes(assertion), 'the assertion never logged')
})
