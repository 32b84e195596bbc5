import t from 'tap'
import { createHmac, randomBytes } from 'node:crypto'
import postgres from 'postgres'
import { compactDecrypt, decodeJwt, decodeProtectedHeader } from 'jose'
import { request } from 'undici'
import type { Test } from 'tap'
import type { Agent } from 'undici'
import type { KeyPair } from '../../gateway/demo/pki.js'
import { keyEncryptionKeyBytes } from '../../shared/config.js'
import { tokenEncryptionKey } from '../../gateway/tokens.js'
import { assertOAuthError, assertProblem } from '../helpers/assert.js'
import { ath, createProofKey, newJti } from '../helpers/dpop.js'
import type { ProofKey } from '../helpers/dpop.js'
import { lockReplayStore } from '../helpers/db.js'
import { startGateway } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'

type Response = Awaited<ReturnType<TestGateway['call']>>
const PATH = '/fhir/Patient/1'

const nowSeconds = (gw: TestGateway): number => Math.floor(gw.clock.now / 1000)

function tokenProof (gw: TestGateway, key: ProofKey, extra: Record<string, unknown> = {}): string {
  return key.proof({ jti: newJti(), htm: 'POST', htu: `${gw.config.gateway.publicUrl}/v1/token`, iat: nowSeconds(gw), ...extra })
}

function resourceProof (gw: TestGateway, key: ProofKey, token: string, extra: Record<string, unknown> = {}): string {
  return key.proof({ jti: newJti(), htm: 'GET', htu: `${gw.config.gateway.publicUrl}${PATH}`, iat: nowSeconds(gw), ath: ath(token), ...extra })
}

async function dpopToken (gw: TestGateway, agent: Agent, key: ProofKey): Promise<string> {
  const res = await gw.call(agent, '/v1/token', { method: 'POST', headers: { dpop: tokenProof(gw, key) } })
  if (res.status !== 200) throw new Error(`token request failed: ${res.status} ${res.text}`)
  return res.json()['access_token'] as string
}

async function use (gw: TestGateway, agent: Agent, token: string, proof: string | undefined, path = PATH): Promise<Response> {
  return await gw.call(agent, path, { headers: { authorization: `DPoP ${token}`, ...(proof === undefined ? {} : { dpop: proof }) } })
}

function assertDpopChallenge (t: Test, res: Response, error: string): void {
  const challenge = String(res.headers['www-authenticate'])
  t.match(challenge, new RegExp(`^DPoP error="${error}"`), `WWW-Authenticate: DPoP error="${error}"`)
  t.match(challenge, /algs="ES256 EdDSA"/, 'names the algorithms')
}

async function setup (t: Test, env: Record<string, string> = {}): Promise<{ gw: TestGateway, agent: Agent, key: ProofKey, pair: KeyPair }> {
  const gw = await startGateway(t, { env })
  const { pair } = await gw.register('ws-dpop')
  return { gw, agent: gw.agent(pair), key: createProofKey(), pair }
}

t.test('a DPoP proof at the token endpoint binds the token to the key (RFC 9449 §5, §6.1)', async t => {
  const { gw, agent, key } = await setup(t)
  for (const alg of ['ES256', 'EdDSA'] as const) {
    const k = alg === 'ES256' ? key : createProofKey('EdDSA')
    const res = await gw.call(agent, '/v1/token', { method: 'POST', headers: { dpop: tokenProof(gw, k) } })
    t.equal(res.status, 200, res.text)
    t.equal(res.json()['token_type'], 'DPoP')
    t.equal(res.headers['cache-control'], 'no-store')
    const token = res.json()['access_token'] as string
    const cnf = decodeJwt(token)['cnf'] as Record<string, string>
    t.equal(cnf['jkt'], k.jkt, `${alg}: cnf.jkt is the key's RFC 7638 thumbprint`)
    t.type(cnf['x5t#S256'], 'string', 'still bound to the certificate')
    const ok = await use(gw, agent, token, resourceProof(gw, k, token))
    t.equal(ok.status, 200, ok.text)
  }
  const seen = gw.upstream.requests.at(-1)
  t.equal(seen?.headers['dpop'], undefined, 'the proof never reaches the EHR')
  t.equal(seen?.headers['authorization'], undefined, 'nor the token')

  // A standard form request with a proof works the same way.
  const form = await gw.call(agent, '/v1/token', { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded', dpop: tokenProof(gw, key) }, body: 'grant_type=client_credentials&client_id=ws-dpop' })
  t.equal(form.json()['token_type'], 'DPoP', form.text)

  const meta = (await gw.call(agent, '/.well-known/oauth-authorization-server')).json()
  t.same(meta['dpop_signing_alg_values_supported'], ['ES256', 'EdDSA'])
  t.same(meta['token_endpoint_auth_methods_supported'], ['tls_client_auth'])
  t.same(meta['grant_types_supported'], ['client_credentials'])
  t.equal(meta['tls_client_certificate_bound_access_tokens'], true)
  t.equal(meta['issuer'], gw.config.tokens.issuer)
  t.equal(meta['token_endpoint'], `${gw.config.gateway.publicUrl}/v1/token`)
  t.equal(meta['jwks_uri'], `${gw.config.gateway.publicUrl}/.well-known/jwks.json`)
})

t.test('a replayed proof is refused, on the same and on a second instance sharing the database', async t => {
  const { gw, agent, key, pair } = await setup(t)
  // The same workstation talking to a second instance behind the load balancer.
  const gw2 = await startGateway(t, { db: gw.db, pki: gw.pki, clock: gw.clock })
  const other = gw2.agent(pair)
  const token = await dpopToken(gw, agent, key)
  const proof = resourceProof(gw, key, token)
  t.equal((await use(gw, agent, token, proof)).status, 200)

  const again = await use(gw, agent, token, proof)
  assertProblem(t, again, 401, 'DPOP_PROOF_REPLAYED')
  assertDpopChallenge(t, again, 'invalid_dpop_proof')

  // The second instance has its own memory, but the store is shared.
  assertProblem(t, await use(gw2, other, token, proof), 401, 'DPOP_PROOF_REPLAYED')
  t.equal((await use(gw2, other, token, resourceProof(gw, key, token))).status, 200, 'a fresh proof works on instance 2')

  // Token requests are proofs too.
  const tp = tokenProof(gw, key)
  t.equal((await gw.call(agent, '/v1/token', { method: 'POST', headers: { dpop: tp } })).status, 200)
  const replayedTokenRequest = await gw2.call(other, '/v1/token', { method: 'POST', headers: { dpop: tp } })
  assertProblem(t, replayedTokenRequest, 400, 'DPOP_PROOF_REPLAYED')
  t.equal(replayedTokenRequest.json()['error'], 'invalid_dpop_proof')

  // Simultaneous: one proof, two requests at once on two instances; exactly one wins.
  for (let round = 0; round < 5; round++) {
    const racing = resourceProof(gw, key, token)
    const results = await Promise.all([use(gw, agent, token, racing), use(gw2, other, token, racing)])
    t.same(results.map(r => r.status).sort(), [200, 401], `round ${round}: exactly one of two simultaneous uses wins`)
  }

  // A burst: the replay store batches concurrent consumes into one statement; one proof sent
  // twenty times at once over both instances is still served once, beside fresh proofs.
  const burst = resourceProof(gw, key, token)
  const mixed = await Promise.all(Array.from({ length: 30 }, async (_, i) => {
    const [g, a] = i % 2 === 0 ? [gw, agent] : [gw2, other]
    return { replay: i < 20, res: await use(g, a, token, i < 20 ? burst : resourceProof(gw, key, token)) }
  }))
  t.equal(mixed.filter(m => m.replay && m.res.status === 200).length, 1, 'the burst of one proof: served once')
  t.same(mixed.filter(m => m.replay && m.res.status !== 200).map(m => m.res.json()['code']), Array(19).fill('DPOP_PROOF_REPLAYED'), 'the rest refused as replays')
  t.same(mixed.filter(m => !m.replay).map(m => m.res.status === 200 ? 200 : m.res.json()['code']), Array(10).fill(200), 'the fresh proofs beside it all served')
})

// A certificate registered on gw's database (the same machine may connect to either instance).
async function registeredPair (gw: TestGateway): Promise<KeyPair> {
  const { pair } = await gw.register(`ws-${randomBytes(3).toString('hex')}`)
  return pair
}

t.test('a proof must match the request, the time, the token and its key', async t => {
  const { gw, agent, key } = await setup(t)
  const token = await dpopToken(gw, agent, key)
  const publicUrl = gw.config.gateway.publicUrl
  const refuse = async (name: string, proof: string | undefined, code: string, error = 'invalid_dpop_proof'): Promise<void> => {
    await t.test(name, async t => {
      const res = await use(gw, agent, token, proof)
      assertProblem(t, res, 401, code)
      assertDpopChallenge(t, res, error)
    })
  }
  await refuse('no proof', undefined, 'DPOP_PROOF_MISSING')
  await refuse('a proof for another method', resourceProof(gw, key, token, { htm: 'POST' }), 'DPOP_METHOD_MISMATCH')
  await refuse('a proof for another URL', resourceProof(gw, key, token, { htu: `${publicUrl}/fhir/Patient/2` }), 'DPOP_URL_MISMATCH')
  await refuse('a proof for another host', resourceProof(gw, key, token, { htu: `https://evil.example${PATH}` }), 'DPOP_URL_MISMATCH')
  await refuse('a token-endpoint proof', tokenProof(gw, key, { ath: ath(token) }), 'DPOP_METHOD_MISMATCH')
  await refuse('stale iat', resourceProof(gw, key, token, { iat: nowSeconds(gw) - 61 }), 'DPOP_PROOF_STALE')
  await refuse('future iat', resourceProof(gw, key, token, { iat: nowSeconds(gw) + 61 }), 'DPOP_PROOF_STALE')
  await refuse('wrong ath', resourceProof(gw, key, token, { ath: ath(`${token}x`) }), 'DPOP_ATH_MISMATCH')
  await refuse('no ath', resourceProof(gw, key, token, { ath: undefined }), 'DPOP_ATH_MISMATCH')
  await refuse('signed by another key than cnf.jkt', resourceProof(gw, createProofKey(), token), 'DPOP_KEY_MISMATCH')
  await refuse('signed by an EdDSA key instead', resourceProof(gw, createProofKey('EdDSA'), token), 'DPOP_KEY_MISMATCH')
  await refuse('private key in the jwk header', key.proof({ jti: newJti(), htm: 'GET', htu: `${publicUrl}${PATH}`, iat: nowSeconds(gw), ath: ath(token) }, { jwk: key.privateJwk }), 'DPOP_PROOF_INVALID')
  const claims = { jti: newJti(), htm: 'GET', htu: `${publicUrl}${PATH}`, iat: nowSeconds(gw), ath: ath(token) }
  const b64 = (v: unknown): string => Buffer.from(JSON.stringify(v)).toString('base64url')
  await refuse('alg none', `${b64({ typ: 'dpop+jwt', alg: 'none', jwk: key.jwk })}.${b64(claims)}.`, 'DPOP_PROOF_INVALID')
  const hsInput = `${b64({ typ: 'dpop+jwt', alg: 'HS256', jwk: key.jwk })}.${b64(claims)}`
  await refuse('alg HS256', `${hsInput}.${createHmac('sha256', Buffer.from(key.jwk['x'] ?? '')).update(hsInput).digest('base64url')}`, 'DPOP_PROOF_INVALID')
  await refuse('typ JWT', key.proof(claims, { typ: 'JWT' }), 'DPOP_PROOF_INVALID')

  await t.test('a proof made in time but used after the window is stale', async t => {
    const proof = resourceProof(gw, key, token)
    gw.clock.advance(61_000)
    assertProblem(t, await use(gw, agent, token, proof), 401, 'DPOP_PROOF_STALE')
    gw.clock.advance(-61_000)
  })

  await t.test('two DPoP headers', async t => {
    const res = await request(gw.url + PATH, {
      dispatcher: agent,
      headers: ['authorization', `DPoP ${token}`, 'dpop', resourceProof(gw, key, token), 'dpop', resourceProof(gw, key, token)]
    })
    const text = await res.body.text()
    assertProblem(t, { status: res.statusCode, headers: res.headers, text, json: () => JSON.parse(text) as Record<string, unknown> }, 401, 'DPOP_MULTIPLE_PROOFS')
  })

  await t.test('the query is not part of htu; the normalised URL matches', async t => {
    const res = await use(gw, agent, token, resourceProof(gw, key, token, { htu: `${publicUrl.toUpperCase().replace('HTTPS', 'https')}:443${PATH}` }), `${PATH}?_format=json`)
    t.equal(res.status, 200, res.text)
  })

  await t.test('a DPoP-bound token used as a Bearer token', async t => {
    const res = await gw.call(agent, PATH, { headers: { authorization: `Bearer ${token}` } })
    assertProblem(t, res, 401, 'TOKEN_DPOP_BOUND')
    assertDpopChallenge(t, res, 'invalid_token')
    const withProof = await gw.call(agent, PATH, { headers: { authorization: `Bearer ${token}`, dpop: resourceProof(gw, key, token) } })
    assertProblem(t, withProof, 401, 'TOKEN_DPOP_BOUND')
  })

  await t.test('a Bearer token sent with the DPoP scheme is bound to no key', async t => {
    const bearer = await gw.fetchToken(agent)
    assertProblem(t, await use(gw, agent, bearer, resourceProof(gw, key, bearer)), 401, 'DPOP_KEY_MISMATCH')
  })

  await t.test('a forged token under the DPoP scheme: TOKEN_INVALID with a DPoP challenge', async t => {
    const res = await use(gw, agent, `${token.slice(0, -4)}AAAA`, resourceProof(gw, key, token))
    assertProblem(t, res, 401, 'TOKEN_INVALID')
    assertDpopChallenge(t, res, 'invalid_token')
  })

  await t.test('bad proofs at the token endpoint are 400 invalid_dpop_proof', async t => {
    const form = { 'content-type': 'application/x-www-form-urlencoded' }
    const cases: Array<[string, string, string]> = [
      ['another URL', tokenProof(gw, key, { htu: `${publicUrl}/v2/token` }), 'DPOP_URL_MISMATCH'],
      ['stale', tokenProof(gw, key, { iat: nowSeconds(gw) - 300 }), 'DPOP_PROOF_STALE'],
      ['alg none', `${b64({ typ: 'dpop+jwt', alg: 'none', jwk: key.jwk })}.${b64({ jti: newJti(), htm: 'POST', htu: `${publicUrl}/v1/token`, iat: nowSeconds(gw) })}.`, 'DPOP_PROOF_INVALID'],
      ['private key', tokenProof(gw, key, {}).replace(/^[^.]+/, b64({ typ: 'dpop+jwt', alg: 'ES256', jwk: key.privateJwk })), 'DPOP_PROOF_INVALID']
    ]
    for (const [name, proof, code] of cases) {
      const res = await gw.call(agent, '/v1/token', { method: 'POST', headers: { ...form, dpop: proof }, body: 'grant_type=client_credentials' })
      assertOAuthError(t, res, 400, code, 'invalid_dpop_proof')
      t.comment(name)
    }
    const plain = await gw.call(agent, '/v1/token', { method: 'POST', headers: { dpop: 'garbage' } })
    assertProblem(t, plain, 400, 'DPOP_PROOF_INVALID')
    t.equal(plain.json()['error'], 'invalid_dpop_proof')
  })
})

t.test('TOKEN_REQUIRE_DPOP: no Bearer tokens are issued or accepted', async t => {
  const { gw, agent, key } = await setup(t, { TOKEN_REQUIRE_DPOP: 'true' })
  const res = await gw.call(agent, '/v1/token', { method: 'POST' })
  assertProblem(t, res, 400, 'DPOP_PROOF_MISSING')
  t.equal(res.json()['error'], 'invalid_dpop_proof')
  const form = await gw.call(agent, '/v1/token', { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: 'grant_type=client_credentials' })
  assertOAuthError(t, form, 400, 'DPOP_PROOF_MISSING', 'invalid_dpop_proof')
  const token = await dpopToken(gw, agent, key)
  t.equal((await use(gw, agent, token, resourceProof(gw, key, token))).status, 200)

  // A Bearer token from an instance without the switch (same database and keys).
  const lax = await startGateway(t, { db: gw.db, pki: gw.pki, clock: gw.clock })
  const pair = await registeredPair(gw)
  const bearer = await lax.fetchToken(lax.agent(pair))
  const refused = await gw.call(gw.agent(pair), PATH, { headers: { authorization: `Bearer ${bearer}` } })
  assertProblem(t, refused, 401, 'DPOP_REQUIRED')
  assertDpopChallenge(t, refused, 'invalid_token')
  const missing = await gw.call(agent, PATH)
  t.equal(missing.headers['www-authenticate'], 'DPoP algs="ES256 EdDSA"', 'only the DPoP scheme is offered')
})

t.test('DPOP_NONCE: server nonces at the token endpoint and on resources (RFC 9449 §8, §9)', async t => {
  const { gw, agent, key, pair } = await setup(t, { DPOP_NONCE: 'true' })
  const first = await gw.call(agent, '/v1/token', { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded', dpop: tokenProof(gw, key) }, body: 'grant_type=client_credentials' })
  assertOAuthError(t, first, 400, 'DPOP_NONCE_REQUIRED', 'use_dpop_nonce')
  const nonce = first.headers['dpop-nonce'] as string
  t.type(nonce, 'string', 'DPoP-Nonce offered')
  const second = await gw.call(agent, '/v1/token', { method: 'POST', headers: { dpop: tokenProof(gw, key, { nonce }) } })
  t.equal(second.status, 200, second.text)
  t.equal(second.headers['dpop-nonce'], nonce, 'the current nonce again')
  const token = second.json()['access_token'] as string

  const challenged = await use(gw, agent, token, resourceProof(gw, key, token))
  assertProblem(t, challenged, 401, 'DPOP_NONCE_REQUIRED')
  assertDpopChallenge(t, challenged, 'use_dpop_nonce')
  t.equal(challenged.headers['dpop-nonce'], nonce)
  assertProblem(t, await use(gw, agent, token, resourceProof(gw, key, token, { nonce: 'made-up' })), 401, 'DPOP_NONCE_REQUIRED')
  const ok = await use(gw, agent, token, resourceProof(gw, key, token, { nonce }))
  t.equal(ok.status, 200, ok.text)
  t.equal(ok.headers['dpop-nonce'], nonce)

  // Nonces are stateless: another instance with the same key agrees.
  const gw2 = await startGateway(t, { db: gw.db, pki: gw.pki, clock: gw.clock, env: { DPOP_NONCE: 'true' } })
  const other = gw2.agent(pair)
  t.equal((await use(gw2, other, token, resourceProof(gw, key, token, { nonce }))).status, 200)
  gw.clock.advance(11 * 60_000)
  const expired = await gw.call(agent, '/v1/token', { method: 'POST', headers: { dpop: tokenProof(gw, key, { nonce }) } })
  assertProblem(t, expired, 400, 'DPOP_NONCE_REQUIRED')
  t.not(expired.headers['dpop-nonce'], nonce, 'a new nonce after the window')
})

t.test('GATEWAY_PUBLIC_URL: proofs name the URL behind the load balancer', async t => {
  const { gw, agent, key } = await setup(t, { GATEWAY_PUBLIC_URL: 'https://lb.hospital.example/ehr/' })
  t.equal(gw.config.gateway.publicUrl, 'https://lb.hospital.example/ehr')
  const res = await gw.call(agent, '/v1/token', { method: 'POST', headers: { dpop: key.proof({ jti: newJti(), htm: 'POST', htu: 'https://lb.hospital.example/ehr/v1/token', iat: nowSeconds(gw) }) } })
  t.equal(res.status, 200, res.text)
  const token = res.json()['access_token'] as string
  t.equal((await use(gw, agent, token, resourceProof(gw, key, token))).status, 200)
  assertProblem(t, await use(gw, agent, token, resourceProof(gw, key, token, { htu: `https://gateway.test${PATH}` })), 401, 'DPOP_URL_MISMATCH')
  const meta = (await gw.call(agent, '/.well-known/oauth-authorization-server')).json()
  t.equal(meta['token_endpoint'], 'https://lb.hospital.example/ehr/v1/token')
})

t.test('TOKEN_SINGLE_USE: a Bearer token is accepted exactly once', async t => {
  const { gw, agent, key, pair } = await setup(t, { TOKEN_SINGLE_USE: 'true' })
  const token = await gw.fetchToken(agent)
  const auth = { authorization: `Bearer ${token}` }
  t.equal((await gw.call(agent, PATH, { headers: auth })).status, 200)
  const again = await gw.call(agent, PATH, { headers: auth })
  assertProblem(t, again, 401, 'TOKEN_REPLAYED')
  t.match(String(again.headers['www-authenticate']), /^Bearer realm="ehr-gateway", error="invalid_token"/)

  // The verified-token cache must not let a second use skip the check: both uses race.
  const gw2 = await startGateway(t, { db: gw.db, pki: gw.pki, clock: gw.clock, env: { TOKEN_SINGLE_USE: 'true' } })
  const other = gw2.agent(pair)
  for (let round = 0; round < 5; round++) {
    const fresh = await gw.fetchToken(agent)
    const h = { authorization: `Bearer ${fresh}` }
    const results = await Promise.all([gw.call(agent, PATH, { headers: h }), gw.call(agent, PATH, { headers: h })])
    t.same(results.map(r => r.status).sort(), [200, 401], `round ${round}: exactly one of two simultaneous uses wins`)
    assertProblem(t, await gw2.call(other, PATH, { headers: h }), 401, 'TOKEN_REPLAYED')
  }
  const crossFresh = await gw.fetchToken(agent)
  const both = await Promise.all([gw.call(agent, PATH, { headers: { authorization: `Bearer ${crossFresh}` } }), gw2.call(other, PATH, { headers: { authorization: `Bearer ${crossFresh}` } })])
  t.same(both.map(r => r.status).sort(), [200, 401], 'across instances too')

  // DPoP tokens are protected per proof instead and serve many requests.
  const bound = await dpopToken(gw, agent, key)
  for (let i = 0; i < 3; i++) t.equal((await use(gw, agent, bound, resourceProof(gw, key, bound))).status, 200)
})

t.test('TOKEN_ENCRYPT: tokens are signed, then encrypted; opaque and tamper-proof', async t => {
  const { gw, agent, key } = await setup(t, { TOKEN_ENCRYPT: 'true' })
  const token = await gw.fetchToken(agent)
  t.equal(token.split('.').length, 5, 'a compact JWE')
  t.same(decodeProtectedHeader(token), { alg: 'dir', enc: 'A256GCM', cty: 'JWT' })
  t.throws(() => decodeJwt(token), 'the claims cannot be decoded')
  const [, , iv = '', ciphertext = '', tag = ''] = token.split('.')
  const visible = Buffer.from(ciphertext, 'base64url').toString('latin1') + token
  for (const secret of ['ws-dpop', '127.0.0.1', 'x5t#S256', gw.config.tokens.issuer]) t.notOk(visible.includes(secret), `${secret} is not readable`)

  t.equal((await gw.call(agent, PATH, { headers: { authorization: `Bearer ${token}` } })).status, 200, 'it works as a Bearer token')
  const bound = await dpopToken(gw, agent, key)
  t.equal(bound.split('.').length, 5)
  t.equal((await use(gw, agent, bound, resourceProof(gw, key, bound))).status, 200, 'ath is over the encrypted form')

  const parts = token.split('.')
  const flip = (s: string): string => (s[0] === 'A' ? 'B' : 'A') + s.slice(1)
  const tampered = [
    [parts[0], parts[1], iv, flip(ciphertext), tag].join('.'),
    [parts[0], parts[1], iv, ciphertext, flip(tag)].join('.'),
    [parts[0], parts[1], flip(iv), ciphertext, tag].join('.'),
    [Buffer.from(JSON.stringify({ alg: 'dir', enc: 'A128GCM', cty: 'JWT' })).toString('base64url'), parts[1], iv, ciphertext, tag].join('.')
  ]
  for (const forged of tampered) {
    const res = await gw.call(agent, PATH, { headers: { authorization: `Bearer ${forged}` } })
    assertProblem(t, res, 401, 'TOKEN_INVALID')
  }

  const kek = keyEncryptionKeyBytes(gw.config.tokens.keyEncryptionKey)
  await t.rejects(compactDecrypt(token, new Uint8Array(randomBytes(32))), 'another key cannot read it')
  await t.rejects(compactDecrypt(token, new Uint8Array(kek)), 'nor the raw key-encryption key')
  const { plaintext } = await compactDecrypt(token, tokenEncryptionKey(kek))
  const inner = new TextDecoder().decode(plaintext)
  t.equal(decodeProtectedHeader(inner).typ, 'at+jwt', 'inside: the signed token')
  t.equal(decodeJwt(inner)['client_id'], 'ws-dpop')
})

t.test('the replay store fails closed: 503 REPLAY_STORE_UNAVAILABLE, never accepted', async t => {
  const { gw, agent, key } = await setup(t, { TOKEN_SINGLE_USE: 'true' })
  const token = await dpopToken(gw, agent, key)
  const bearer = await gw.fetchToken(agent)
  t.equal((await use(gw, agent, token, resourceProof(gw, key, token))).status, 200, 'warm: machine and token cached')

  // A store that hangs: the table locked by someone else. Refused after the timeout.
  const unlock = await lockReplayStore(gw.db.url)
  const started = Date.now()
  assertProblem(t, await use(gw, agent, token, resourceProof(gw, key, token)), 503, 'REPLAY_STORE_UNAVAILABLE')
  t.ok(Date.now() - started < 10_000, 'answered without waiting for the lock')
  await unlock()

  await gw.db.sql`alter table replay_ids rename to replay_ids_away`
  assertProblem(t, await use(gw, agent, token, resourceProof(gw, key, token)), 503, 'REPLAY_STORE_UNAVAILABLE')
  assertProblem(t, await gw.call(agent, PATH, { headers: { authorization: `Bearer ${bearer}` } }), 503, 'REPLAY_STORE_UNAVAILABLE')
  const tokenRequest = await gw.call(agent, '/v1/token', { method: 'POST', headers: { dpop: tokenProof(gw, key) } })
  assertProblem(t, tokenRequest, 503, 'REPLAY_STORE_UNAVAILABLE')
  t.equal(tokenRequest.json()['error'], 'temporarily_unavailable')
  t.equal(await gw.app.gateway.replay.cleanup(), 0, 'cleanup errors are logged, not thrown')
  t.ok(gw.logs.some(l => l.includes('deleting expired replay entries failed')), 'and logged')
  await gw.db.sql`alter table replay_ids_away rename to replay_ids`
  t.equal((await gw.call(agent, PATH, { headers: { authorization: `Bearer ${bearer}` } })).status, 200, 'back: the Bearer token was never consumed')

  // A real outage: the database refuses every connection.
  const dbName = new URL(gw.db.url).pathname.slice(1)
  const admin = postgres(process.env['DATABASE_URL'] ?? '', { max: 1, onnotice: () => {} })
  t.teardown(async () => {
    await admin.unsafe(`alter database ${dbName} with allow_connections true`).catch(() => {})
    await admin.end({ timeout: 1 })
  })
  await admin.unsafe(`alter database ${dbName} with allow_connections false`)
  await admin`select pg_terminate_backend(pid) from pg_stat_activity where datname = ${dbName} and pid <> pg_backend_pid()`
  const down = await use(gw, agent, token, resourceProof(gw, key, token))
  t.equal(down.status, 503, down.text)
  t.match(String(down.json()['code']), /^(REPLAY_STORE_UNAVAILABLE|DB_UNREACHABLE)$/, 'coded')
  await admin.unsafe(`alter database ${dbName} with allow_connections true`)
})

t.test('expired replay entries are deleted off the request path', async t => {
  const { gw, agent, key } = await setup(t)
  const token = await dpopToken(gw, agent, key)
  for (let i = 0; i < 3; i++) await use(gw, agent, token, resourceProof(gw, key, token))
  const count = async (): Promise<number> => ((await gw.db.sql<Array<{ n: number }>>`select count(*)::int as n from replay_ids`)[0]?.n ?? -1)
  t.equal(await count(), 4, 'one entry per proof (token request included)')
  t.equal(await gw.app.gateway.replay.cleanup(), 0, 'nothing expired yet')
  gw.clock.advance(62_000)
  t.equal(await gw.app.gateway.replay.cleanup(), 4)
  t.equal(await count(), 0)
})
