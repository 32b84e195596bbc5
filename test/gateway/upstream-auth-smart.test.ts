import t from 'tap'
import { generateKeyPairSync, randomBytes } from 'node:crypto'
import type { KeyObject } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { calculateJwkThumbprint, decodeProtectedHeader, exportJWK, jwtVerify } from 'jose'
import type { Test } from 'tap'
import { closedPort } from '../helpers/assert.js'
import { startGateway, TEST_API_KEY } from '../helpers/gateway.js'
import { proxyClient, tokenServer, tokenFor, waitFor } from '../helpers/token-server.js'

const CLIENT_ID = 'ehr-gateway-backend-' + randomBytes(4).toString('hex')

async function keyFile (t: Test, privateKey: KeyObject): Promise<string> {
  const file = join(t.testdir(), 'smart.key')
  await writeFile(file, privateKey.export({ type: 'pkcs8', format: 'pem' }))
  return file
}

t.test('SMART Backend Services (ES384): private_key_jwt assertion, claims and signature, single flight', async t => {
  const server = await tokenServer(t, 'smart-at')
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-384' })
  const gw = await startGateway(t, {
    env: {
      SMART_TOKEN_URL: server.url,
      SMART_CLIENT_ID: CLIENT_ID,
      SMART_PRIVATE_KEY_FILE: await keyFile(t, privateKey),
      SMART_SCOPE: 'system/Patient.rs system/Observation.rs',
      RATE_LIMIT_MAX: '100000'
    }
  })
  // The token endpoint takes its time: 100 requests arrive while the first fetch runs.
  server.issue({ delayMs: 300, expiresIn: 300 })
  const call = await proxyClient(gw)
  const results = await Promise.all(Array.from({ length: 100 }, async () => await call()))
  t.ok(results.every(r => r.status === 200), '100 concurrent requests served')
  t.equal(server.requests.length, 1, 'single flight: one token fetch for 100 waiting requests')
  t.ok(gw.upstream.requests.every(r => r.headers.authorization === `Bearer ${tokenFor('smart-at', 1)}`), "the client's own Authorization never reaches the upstream")
  t.ok(gw.upstream.requests.every(r => r.headers['x-api-key'] === TEST_API_KEY))

  const form = server.requests[0]?.form ?? {}
  t.equal(form['grant_type'], 'client_credentials')
  t.equal(form['client_assertion_type'], 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer')
  t.equal(form['scope'], 'system/Patient.rs system/Observation.rs')
  const assertion = form['client_assertion'] ?? ''
  const header = decodeProtectedHeader(assertion)
  t.equal(header.alg, 'ES384')
  t.equal(header.typ, 'JWT')
  t.equal(header.kid, await calculateJwkThumbprint(await exportJWK(publicKey)), 'kid defaults to the RFC 7638 thumbprint')
  const { payload } = await jwtVerify(assertion, publicKey, { algorithms: ['ES384'], currentDate: new Date(gw.clock.now) })
  t.equal(payload.iss, CLIENT_ID)
  t.equal(payload.sub, CLIENT_ID)
  t.equal(payload.aud, server.url)
  t.ok(typeof payload.exp === 'number' && payload.exp - Math.floor(gw.clock.now / 1000) <= 300, 'exp at most five minutes ahead')
  t.type(payload.jti, 'string')

  // A 300 s token: refreshed once less than 60 s is left.
  gw.clock.advance(250_000)
  t.equal((await call()).status, 200)
  await waitFor(t, 'refreshed ahead of expiry', () => server.requests.length === 2)
  const second = server.requests[1]?.form['client_assertion'] ?? ''
  const { payload: again } = await jwtVerify(second, publicKey, { algorithms: ['ES384'], currentDate: new Date(gw.clock.now) })
  t.not(again.jti, payload.jti, 'a fresh jti per assertion')
  t.equal(again.iat, Math.floor(gw.clock.now / 1000), 'claims follow the injected clock')
  t.notOk(gw.logs.join('').includes(assertion), 'the assertion never logged')
})

t.test('SMART with RS384 and an explicit SMART_KEY_ID', async t => {
  const server = await tokenServer(t, 'smart-rsa')
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
  const gw = await startGateway(t, {
    env: { SMART_TOKEN_URL: server.url, SMART_CLIENT_ID: CLIENT_ID, SMART_PRIVATE_KEY_FILE: await keyFile(t, privateKey), SMART_KEY_ID: 'epic-key-2026', SMART_ALG: 'RS384', EHR_API_KEY: '' }
  })
  const call = await proxyClient(gw)
  t.equal((await call()).status, 200)
  const assertion = server.requests[0]?.form['client_assertion'] ?? ''
  t.equal(decodeProtectedHeader(assertion).kid, 'epic-key-2026')
  await jwtVerify(assertion, publicKey, { algorithms: ['RS384'], currentDate: new Date(gw.clock.now), issuer: CLIENT_ID, subject: CLIENT_ID, audience: server.url })
  t.equal(server.requests[0]?.form['scope'], undefined, 'no scope unless configured')
  t.equal(gw.upstream.requests.at(-1)?.headers['x-api-key'], undefined)
})

t.test('token endpoint down, slow or refusing: coded 502 quickly, no pile-up, recovery by itself', async t => {
  const server = await tokenServer(t, 'smart-flaky')
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-384' })
  const downUrl = `http://127.0.0.1:${await closedPort()}/token`
  const gw = await startGateway(t, {
    env: {
      SMART_TOKEN_URL: server.url,
      SMART_CLIENT_ID: CLIENT_ID,
      SMART_PRIVATE_KEY_FILE: await keyFile(t, privateKey),
      UPSTREAM_AUTH_TIMEOUT_MS: '400',
      RATE_LIMIT_MAX: '100000'
    }
  })
  const call = await proxyClient(gw)
  const upstreamBefore = gw.upstream.requests.length

  // Slow: the endpoint never answers. 50 waiting requests all get the 502 within the bound.
  server.setHandler(() => {})
  let started = performance.now()
  const slow = await Promise.all(Array.from({ length: 50 }, async () => await call()))
  const slowMs = performance.now() - started
  t.ok(slow.every(r => r.status === 502 && r.text.includes('UPSTREAM_AUTH_FAILED')), 'every waiting request: 502 UPSTREAM_AUTH_FAILED')
  // Without the bound they would wait forever; the margin is for a loaded CI machine.
  t.ok(slowMs < 20_000, `answered, not left hanging (${Math.round(slowMs)} ms for a 400 ms timeout)`)
  t.equal(server.requests.length, 1, 'one fetch for all of them')

  // Inside the back-off nothing is fetched; requests fail at once.
  started = performance.now()
  const fast = await call()
  t.equal(fast.status, 502)
  t.ok(performance.now() - started < 10_000, 'failed while backing off, without waiting for the endpoint')
  t.equal(server.requests.length, 1, 'a dead endpoint is not hammered')

  // 400 invalid_grant after the back-off.
  server.setHandler((_req, res) => {
    res.writeHead(400, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'invalid_client', error_description: 'assertion rejected' }))
  })
  gw.clock.advance(1500)
  const refused = await call()
  t.equal(refused.status, 502)
  t.match(refused.text, /UPSTREAM_AUTH_FAILED/)
  t.equal(server.requests.length, 2)

  // Recovers by itself once the endpoint does.
  server.issue()
  gw.clock.advance(1500)
  t.equal((await call()).status, 502, 'still inside the doubled back-off')
  gw.clock.advance(1000)
  const ok = await call()
  t.equal(ok.status, 200, 'service resumes')
  t.equal(gw.upstream.requests.length - upstreamBefore, 1, 'the upstream saw only the request that had a token')

  const logs = gw.logs.join('')
  t.match(logs, /did not answer within 400 ms/)
  t.match(logs, /"oauthError":"invalid_client"/)
  t.notMatch(logs, /eyJ[A-Za-z0-9_-]{10,}\.eyJ/, 'no JWT (assertion or token) in the logs')
  t.notOk(logs.includes(tokenFor('smart-flaky', 1)))
  t.notMatch(logs, /assertion rejected/, "the endpoint's free text is not logged")
  const metrics = await gw.app.gateway.metrics.registry.metrics()
  t.match(metrics, /ehr_gateway_upstream_token_fetches_total\{mode="smart",result="error"\} 2/)
  t.match(metrics, /ehr_gateway_upstream_token_fetches_total\{mode="smart",result="ok"\} 1/)

  // Down: nothing listens on the token URL.
  const down = await startGateway(t, {
    db: gw.db,
    env: { SMART_TOKEN_URL: downUrl, SMART_CLIENT_ID: CLIENT_ID, SMART_PRIVATE_KEY_FILE: await keyFile(t, privateKey) }
  })
  const downCall = await proxyClient(down)
  started = performance.now()
  const res = await downCall()
  t.equal(res.status, 502)
  t.match(res.text, /UPSTREAM_AUTH_FAILED/)
  t.ok(performance.now() - started < 10_000, 'connection refused is answered without waiting for the timeout')
  t.match(down.logs.join(''), /token endpoint unreachable \(ECONNREFUSED\)/)
})
