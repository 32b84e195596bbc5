import t from 'tap'
import { X509Certificate, createHash, createHmac, createPublicKey, generateKeyPairSync } from 'node:crypto'
import type { KeyObject } from 'node:crypto'
import { SignJWT, decodeJwt, decodeProtectedHeader } from 'jose'
import type { JWK, JWTPayload } from 'jose'
import { Agent } from 'undici'
import type { KeyPair } from '../../gateway/demo/pki.js'
import { keyEncryptionKeyBytes } from '../../shared/config.js'
import { signingKeysRepository } from '../../shared/db/signing-keys.js'
import { generateSigningKey } from '../../shared/keys.js'
import { startGateway } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'
import { assertOAuthError, assertProblem } from '../helpers/assert.js'

type Response = Awaited<ReturnType<TestGateway['call']>>


const b64 = (value: unknown): string => Buffer.from(JSON.stringify(value)).toString('base64url')
const bearer = (token: string): Record<string, string> => ({ authorization: `Bearer ${token}` })
const thumbprintOf = (pair: KeyPair): string => createHash('sha256').update(new X509Certificate(pair.cert).raw).digest('base64url')

function parts (token: string): { header: Record<string, unknown>, payload: Record<string, unknown>, h: string, p: string, s: string } {
  const [h = '', p = '', s = ''] = token.split('.')
  return {
    header: JSON.parse(Buffer.from(h, 'base64url').toString()) as Record<string, unknown>,
    payload: JSON.parse(Buffer.from(p, 'base64url').toString()) as Record<string, unknown>,
    h, p, s
  }
}

async function sign (key: KeyObject, header: { alg: string, kid?: string, typ?: string }, payload: JWTPayload): Promise<string> {
  return await new SignJWT(payload).setProtectedHeader(header).sign(key)
}

async function fhir (gw: TestGateway, agent: Agent, token: string, headers: Record<string, string> = {}): Promise<Response> {
  return await gw.call(agent, '/fhir/Patient/1', { headers: { ...bearer(token), ...headers } })
}

t.test('a valid token is accepted and the token response follows RFC 6749 / RFC 9068', async t => {
  const gw = await startGateway(t)
  const { machine, pair } = await gw.register('ws-01')
  const agent = gw.agent(pair)
  const res = await gw.call(agent, '/v1/token', { method: 'POST' })
  t.equal(res.status, 200, res.text)
  t.equal(res.headers['cache-control'], 'no-store')
  const body = res.json()
  t.equal(body['token_type'], 'Bearer')
  t.equal(body['expires_in'], gw.config.tokens.ttlSeconds)
  t.equal(body['expires_in'], 300, 'TOKEN_TTL_SECONDS default')
  const token = body['access_token'] as string
  const header = decodeProtectedHeader(token)
  t.equal(header.typ, 'at+jwt')
  t.equal(header.alg, 'EdDSA')
  t.type(header.kid, 'string')
  const claims = decodeJwt(token)
  t.equal(claims.iss, gw.config.tokens.issuer)
  t.equal(claims.iss, 'https://gateway.test')
  t.equal(claims.aud, gw.config.tokens.audience)
  t.equal(claims.sub, machine.id)
  t.equal(claims['client_id'], 'ws-01')
  t.match(claims.jti, /^[0-9a-f-]{36}$/)
  t.same(claims['cnf'], { 'x5t#S256': thumbprintOf(pair) })
  t.equal(claims['ip'], '127.0.0.1')
  t.equal((claims.exp ?? 0) - (claims.iat ?? 0), gw.config.tokens.ttlSeconds)
  const ok = await fhir(gw, agent, token)
  t.equal(ok.status, 200, ok.text)
  t.equal(gw.upstream.requests.length, 1)

  const jwks = await gw.call(agent, '/.well-known/jwks.json')
  const kids = (jwks.json()['keys'] as JWK[]).map(k => k.kid)
  t.ok(kids.includes(header.kid), 'the signing kid is published')
})

t.test('standard OAuth client_credentials requests', async t => {
  const gw = await startGateway(t)
  const { pair } = await gw.register('ws-01')
  const agent = gw.agent(pair)
  const form = { 'content-type': 'application/x-www-form-urlencoded' }

  const ok = await gw.call(agent, '/v1/token', { method: 'POST', headers: form, body: 'grant_type=client_credentials&client_id=ws-01' })
  t.equal(ok.status, 200, ok.text)
  t.equal(ok.json()['token_type'], 'Bearer')
  t.equal(ok.headers['cache-control'], 'no-store')
  const used = await fhir(gw, agent, ok.json()['access_token'] as string)
  t.equal(used.status, 200, used.text)

  const json = await gw.call(agent, '/v1/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"grant_type":"client_credentials"}' })
  t.equal(json.status, 200, json.text)

  // RFC 6749 §5.2 errors, as application/json for form requests (issue 3).
  const wrongClient = await gw.call(agent, '/v1/token', { method: 'POST', headers: form, body: 'grant_type=client_credentials&client_id=ws-02' })
  assertOAuthError(t, wrongClient, 401, 'CLIENT_ID_MISMATCH', 'invalid_client')
  const wrongGrant = await gw.call(agent, '/v1/token', { method: 'POST', headers: form, body: 'grant_type=password&client_id=ws-01&username=a&password=b' })
  assertOAuthError(t, wrongGrant, 400, 'GRANT_TYPE_UNSUPPORTED', 'unsupported_grant_type')
  const codeGrant = await gw.call(agent, '/v1/token', { method: 'POST', headers: form, body: 'grant_type=authorization_code&code=x' })
  assertOAuthError(t, codeGrant, 400, 'GRANT_TYPE_UNSUPPORTED', 'unsupported_grant_type')
  // Not a form: problem+json, with the OAuth members too.
  const jsonGrant = await gw.call(agent, '/v1/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"grant_type":"password"}' })
  assertProblem(t, jsonGrant, 400, 'GRANT_TYPE_UNSUPPORTED')
  t.equal(jsonGrant.json()['error'], 'unsupported_grant_type')
  t.equal(gw.upstream.requests.length, 1, 'refusals never reach the upstream')
})

t.test('missing, malformed and forged tokens', async t => {
  const gw = await startGateway(t)
  const a = await gw.register('ws-a')
  const b = await gw.register('ws-b')
  const agent = gw.agent(a.pair)
  const token = await gw.fetchToken(agent)
  const real = parts(token)
  const kid = real.header['kid'] as string
  const jwks = (await gw.call(agent, '/.well-known/jwks.json')).json()['keys'] as JWK[]
  const publicJwk = jwks.find(k => k.kid === kid) as JWK

  await t.test('the genuine token works', async t => {
    const res = await fhir(gw, agent, token)
    t.equal(res.status, 200, res.text)
  })

  await t.test('no Authorization header: 401 TOKEN_MISSING with a challenge', async t => {
    const res = await gw.call(agent, '/fhir/Patient/1')
    assertProblem(t, res, 401, 'TOKEN_MISSING')
    t.match(String(res.headers['www-authenticate']), /^Bearer /)
  })

  // (`DPoP <unbound token>` is refused as DPOP_KEY_MISMATCH: test/gateway/dpop.test.ts.)
  await t.test('another scheme is not a bearer token: TOKEN_MISSING', async t => {
    for (const authorization of [`Basic ${Buffer.from('ws-a:secret').toString('base64')}`, 'Bearer', 'Bearer ', token]) {
      const res = await gw.call(agent, '/fhir/Patient/1', { headers: { authorization } })
      assertProblem(t, res, 401, 'TOKEN_MISSING')
      t.match(String(res.headers['www-authenticate']), /^Bearer /)
    }
  })

  await t.test('garbage: TOKEN_INVALID', async t => {
    for (const garbage of ['garbage', 'a.b.c', 'a.b', `${real.h}.${real.p}`, `${real.h}.${real.p}.${real.s}.x`, `${real.h}..${real.s}`, b64({}) + '.' + b64({}) + '.']) {
      const res = await fhir(gw, agent, garbage)
      assertProblem(t, res, 401, 'TOKEN_INVALID')
      t.match(String(res.headers['www-authenticate']), /error="invalid_token"/)
    }
  })

  await t.test('alg none with the same claims: TOKEN_INVALID', async t => {
    for (const alg of ['none', 'None', 'NONE']) {
      const unsigned = `${b64({ ...real.header, alg })}.${real.p}.`
      assertProblem(t, await fhir(gw, agent, unsigned), 401, 'TOKEN_INVALID')
      const keptSignature = `${b64({ ...real.header, alg })}.${real.p}.${real.s}`
      assertProblem(t, await fhir(gw, agent, keptSignature), 401, 'TOKEN_INVALID')
    }
  })

  await t.test('tampered payload, signature kept: TOKEN_INVALID', async t => {
    const tampered = [
      { ...real.payload, ip: '127.0.0.2' },
      { ...real.payload, sub: b.machine.id, client_id: 'ws-b', cnf: { 'x5t#S256': thumbprintOf(b.pair) } },
      { ...real.payload, exp: (real.payload['exp'] as number) + 86_400 }
    ]
    for (const payload of tampered) {
      assertProblem(t, await fhir(gw, agent, `${real.h}.${b64(payload)}.${real.s}`), 401, 'TOKEN_INVALID')
    }
    // the machine-B variant, presented with B's own certificate
    const asB = `${real.h}.${b64(tampered[1])}.${real.s}`
    assertProblem(t, await fhir(gw, gw.agent(b.pair), asB), 401, 'TOKEN_INVALID')
  })

  await t.test('tampered signature: TOKEN_INVALID', async t => {
    const flip = (s: string, i: number): string => s.slice(0, i) + (s[i] === 'A' ? 'B' : 'A') + s.slice(i + 1)
    for (const i of [0, 10, 40]) {
      assertProblem(t, await fhir(gw, agent, `${real.h}.${real.p}.${flip(real.s, i)}`), 401, 'TOKEN_INVALID')
    }
    const sig = Buffer.from(real.s, 'base64url')
    assertProblem(t, await fhir(gw, agent, `${real.h}.${real.p}.${sig.subarray(0, 32).toString('base64url')}`), 401, 'TOKEN_INVALID')
  })

  await t.test("signed with the attacker's own keys under the real kid: TOKEN_INVALID", async t => {
    const ed = generateKeyPairSync('ed25519').privateKey
    assertProblem(t, await fhir(gw, agent, await sign(ed, { alg: 'EdDSA', kid, typ: 'at+jwt' }, real.payload)), 401, 'TOKEN_INVALID')
    const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey
    assertProblem(t, await fhir(gw, agent, await sign(ec, { alg: 'ES256', kid, typ: 'at+jwt' }, real.payload)), 401, 'TOKEN_INVALID')
    // no kid, an unknown kid, and a kid naming the attacker's key embedded as `jwk`
    assertProblem(t, await fhir(gw, agent, await sign(ed, { alg: 'EdDSA', typ: 'at+jwt' }, real.payload)), 401, 'TOKEN_INVALID')
    assertProblem(t, await fhir(gw, agent, await sign(ed, { alg: 'EdDSA', kid: 'attacker', typ: 'at+jwt' }, real.payload)), 401, 'TOKEN_INVALID')
    const attackerJwk = createPublicKey(ed).export({ format: 'jwk' })
    const embedded = await new SignJWT(real.payload).setProtectedHeader({ alg: 'EdDSA', kid, typ: 'at+jwt', jwk: attackerJwk as JWK }).sign(ed)
    assertProblem(t, await fhir(gw, agent, embedded), 401, 'TOKEN_INVALID')
  })

  await t.test('HS256 keyed with the public key (algorithm confusion): TOKEN_INVALID', async t => {
    const pub = createPublicKey({ key: publicJwk as import('node:crypto').JsonWebKey, format: 'jwk' })
    const secrets: Array<string | Buffer> = [
      JSON.stringify(publicJwk),
      pub.export({ format: 'pem', type: 'spki' }).toString(),
      pub.export({ format: 'der', type: 'spki' }),
      Buffer.from(publicJwk.x ?? '', 'base64url'),
      publicJwk.x ?? ''
    ]
    for (const secret of secrets) {
      for (const alg of ['HS256', 'HS512']) {
        const h = b64({ alg, kid, typ: 'at+jwt' })
        const mac = createHmac(alg === 'HS256' ? 'sha256' : 'sha512', secret).update(`${h}.${real.p}`).digest('base64url')
        assertProblem(t, await fhir(gw, agent, `${h}.${real.p}.${mac}`), 401, 'TOKEN_INVALID')
      }
    }
  })

  // The claims checks in isolation need the gateway's own key (as if it had signed another
  // kind of token): each token below differs from a valid one in one respect only.
  await t.test('signed by the real key but the wrong type, issuer or claims', async t => {
    const key = gw.app.gateway.keys.current().privateKey
    const good = await sign(key, { alg: 'EdDSA', kid, typ: 'at+jwt' }, { ...real.payload, jti: 'control' })
    t.equal((await fhir(gw, agent, good)).status, 200, 'control: the same construction with the right typ works')
    for (const typ of ['JWT', 'dpop+jwt', 'id+jwt', undefined]) {
      const header = typ === undefined ? { alg: 'EdDSA', kid } : { alg: 'EdDSA', kid, typ }
      assertProblem(t, await fhir(gw, agent, await sign(key, header, real.payload)), 401, 'TOKEN_INVALID')
    }
    assertProblem(t, await fhir(gw, agent, await sign(key, { alg: 'EdDSA', kid, typ: 'at+jwt' }, { ...real.payload, iss: 'https://evil.test' })), 401, 'TOKEN_INVALID')
    for (const missing of ['cnf', 'ip', 'jti', 'sub', 'exp', 'client_id']) {
      const payload = { ...real.payload }
      delete payload[missing]
      assertProblem(t, await fhir(gw, agent, await sign(key, { alg: 'EdDSA', kid, typ: 'at+jwt' }, payload)), 401, 'TOKEN_INVALID')
    }
    const now = Math.floor(gw.clock.now / 1000)
    const future = await sign(key, { alg: 'EdDSA', kid, typ: 'at+jwt' }, { ...real.payload, nbf: now + 3600 })
    assertProblem(t, await fhir(gw, agent, future), 401, 'TOKEN_NOT_YET_VALID')
  })

  await t.test("machine A's token with machine B's certificate: TOKEN_WRONG_MACHINE", async t => {
    const res = await fhir(gw, gw.agent(b.pair), token)
    assertProblem(t, res, 401, 'TOKEN_WRONG_MACHINE')
    t.match(String(res.headers['www-authenticate']), /error="invalid_token"/)
  })

  await t.test('token used from another client IP: TOKEN_WRONG_IP, forwarding headers do not help', async t => {
    // undici takes localAddress as a client option; inside `connect` it is silently ignored
    const elsewhere = new Agent({ localAddress: '127.0.0.2', connect: { ca: gw.pki.ca.cert, cert: a.pair.cert, key: a.pair.key } })
    t.teardown(async () => { await elsewhere.close() })
    assertProblem(t, await fhir(gw, elsewhere, token), 401, 'TOKEN_WRONG_IP')
    const spoofs: Array<Record<string, string>> = [{ 'x-forwarded-for': '127.0.0.1' }, { forwarded: 'for=127.0.0.1' }, { 'x-real-ip': '127.0.0.1' }]
    for (const headers of spoofs) {
      assertProblem(t, await fhir(gw, elsewhere, token, headers), 401, 'TOKEN_WRONG_IP')
    }
    // a token fetched from 127.0.0.2 is bound there, and works there only
    const local = await gw.fetchToken(elsewhere)
    t.equal(decodeJwt(local)['ip'], '127.0.0.2')
    t.equal((await fhir(gw, elsewhere, local)).status, 200)
    assertProblem(t, await fhir(gw, agent, local), 401, 'TOKEN_WRONG_IP')
  })
})

t.test('expiry is enforced by the injected clock, also for a token already accepted', async t => {
  const gw = await startGateway(t)
  const { pair } = await gw.register('ws-01')
  const agent = gw.agent(pair)
  const used = await gw.fetchToken(agent)
  const unused = await gw.fetchToken(agent)
  t.equal((await fhir(gw, agent, used)).status, 200, 'accepted while fresh (now in the verified cache)')
  gw.clock.advance((gw.config.tokens.ttlSeconds + 10) * 1000)
  const res = await fhir(gw, agent, used)
  assertProblem(t, res, 401, 'TOKEN_EXPIRED')
  t.match(String(res.headers['www-authenticate']), /error="invalid_token"/)
  assertProblem(t, await fhir(gw, agent, unused), 401, 'TOKEN_EXPIRED')
  const fresh = await gw.fetchToken(agent)
  t.equal((await fhir(gw, agent, fresh)).status, 200, 'a new token works at the new time')
})

t.test('tokens of another gateway on the same database', async t => {
  const gw = await startGateway(t)
  const { pair } = await gw.register('ws-01')
  const other = await startGateway(t, { db: gw.db, pki: gw.pki, env: { TOKEN_AUDIENCE: 'https://other.test/fhir' } })
  const foreignIssuer = await startGateway(t, { db: gw.db, pki: gw.pki, env: { TOKEN_ISSUER: 'https://evil.test', TOKEN_AUDIENCE: gw.config.tokens.audience } })
  t.not(other.config.tokens.audience, gw.config.tokens.audience)
  const agent = gw.agent(pair)

  const foreign = await other.fetchToken(other.agent(pair))
  t.equal(decodeProtectedHeader(foreign).kid, decodeProtectedHeader(await gw.fetchToken(agent)).kid, 'same signing key')
  t.equal((await fhir(other, other.agent(pair), foreign)).status, 200, 'valid where it was issued')
  assertProblem(t, await fhir(gw, agent, foreign), 401, 'TOKEN_WRONG_AUDIENCE')

  const wrongIss = await foreignIssuer.fetchToken(foreignIssuer.agent(pair))
  assertProblem(t, await fhir(gw, agent, wrongIss), 401, 'TOKEN_INVALID')
})

t.test('signing key rotation', async t => {
  const gw = await startGateway(t)
  const { pair } = await gw.register('ws-01')
  const agent = gw.agent(pair)
  const repo = signingKeysRepository(gw.db.sql)
  const kek = keyEncryptionKeyBytes(gw.config.tokens.keyEncryptionKey)
  const jwksKids = async (): Promise<string[]> =>
    ((await gw.call(gw.agent(), '/.well-known/jwks.json')).json()['keys'] as JWK[]).map(k => k.kid as string).sort()

  const usedOld = await gw.fetchToken(agent)
  const unusedOld = await gw.fetchToken(agent)
  const justRotated = await gw.fetchToken(agent)
  const oldKid = decodeProtectedHeader(usedOld).kid as string
  t.equal((await fhir(gw, agent, usedOld)).status, 200)

  const created = await repo.rotateTo(await generateSigningKey(gw.config.tokens.alg, kek))
  await gw.app.gateway.keys.reload()
  const fresh = await gw.fetchToken(agent)
  t.equal(decodeProtectedHeader(fresh).kid, created.kid, 'new tokens carry the new kid')
  t.not(created.kid, oldKid)
  t.same(await jwksKids(), [oldKid, created.kid].sort(), 'JWKS lists the current and the previous key')
  t.equal((await fhir(gw, agent, fresh)).status, 200)
  t.equal((await fhir(gw, agent, justRotated)).status, 200, 'a token of the key rotated out just now still verifies')

  await gw.db.sql`update signing_keys set retired_at = now() - interval '1 day' where kid = ${oldKid}`
  await gw.app.gateway.keys.reload()
  t.same(await jwksKids(), [created.kid], 'the long-retired key is no longer published')
  assertProblem(t, await fhir(gw, agent, unusedOld), 401, 'TOKEN_INVALID')
  t.equal((await fhir(gw, agent, fresh)).status, 200, 'tokens of the current key still work')

  // The verified-claims cache must not keep a retired key's tokens alive.
  await t.test('a token of the retired key that was accepted before is refused too', async t => {
    assertProblem(t, await fhir(gw, agent, usedOld), 401, 'TOKEN_INVALID')
    assertProblem(t, await fhir(gw, agent, justRotated), 401, 'TOKEN_INVALID')
  })
})

// A key is rotated because it may have leaked: once the grace period (TTL + tolerance) is
// over, a token minted with it must fail even though nothing else changed in the database.
t.test('a rotated-out key stops verifying when its grace period ends', async t => {
  const gw = await startGateway(t, { env: { TOKEN_TTL_SECONDS: '10', TOKEN_CLOCK_TOLERANCE_SECONDS: '0' } })
  const { pair } = await gw.register('ws-01')
  const agent = gw.agent(pair)
  const genuine = parts(await gw.fetchToken(agent))
  const leaked = gw.app.gateway.keys.current()
  const kek = keyEncryptionKeyBytes(gw.config.tokens.keyEncryptionKey)
  const created = await signingKeysRepository(gw.db.sql).rotateTo(await generateSigningKey(gw.config.tokens.alg, kek))
  await gw.app.gateway.keys.reload()

  // The grace period ends by the gateway's clock, with no reload or NOTIFY needed. It runs
  // from retired_at, the database's now() at the rotation: counting from the test clock's
  // start instead flaked on a loaded machine, where startGateway to rotation took > 1.5 s.
  const retiredAt = (await signingKeysRepository(gw.db.sql).list()).find(k => k.kid === leaked.kid)?.retiredAt
  gw.clock.now = (retiredAt?.getTime() ?? gw.clock.now) + 11_500
  const now = Math.floor(gw.clock.now / 1000)
  const forge = async (jti: string): Promise<string> => await sign(leaked.privateKey, { alg: leaked.alg, kid: leaked.kid, typ: 'at+jwt' },
    { ...genuine.payload, jti, iat: now, nbf: now, exp: now + 10 })
  const forged = await forge('forged-1')
  const control = await forge('forged-2')

  await t.test('without any further key change', async t => {
    const kids = ((await gw.call(agent, '/.well-known/jwks.json')).json()['keys'] as JWK[]).map(k => k.kid)
    t.same(kids, [created.kid], 'only the current key is published after the grace period')
    assertProblem(t, await fhir(gw, agent, forged), 401, 'TOKEN_INVALID')
  })

  // And after a reload from the database, which agrees.
  await gw.app.gateway.keys.reload()
  assertProblem(t, await fhir(gw, agent, control), 401, 'TOKEN_INVALID')
})
