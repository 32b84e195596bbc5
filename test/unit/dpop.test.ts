import t from 'tap'
import { createHmac, randomBytes } from 'node:crypto'
import { calculateJwkThumbprint } from 'jose'
import { DpopNonces, accessTokenHash, checkProof, jwkThumbprint, normaliseHtu, parseProof } from '../../gateway/dpop.js'
import type { ProofContext } from '../../gateway/dpop.js'
import { GatewayError } from '../../shared/errors.js'
import { createProofKey, newJti } from '../helpers/dpop.js'

const b64 = (value: unknown): string => Buffer.from(JSON.stringify(value)).toString('base64url')
const now = 1_800_000_000
const url = 'https://gw.example/fhir/Patient/1'
const claims = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({ jti: newJti(), htm: 'GET', htu: url, iat: now, ...extra })
const ctx = (extra: Partial<ProofContext> = {}): ProofContext => ({ method: 'GET', url, nowSeconds: now, maxAgeSeconds: 60, ...extra })

function codeOf (fn: () => unknown): string | undefined {
  try {
    fn()
    return undefined
  } catch (err) {
    return err instanceof GatewayError ? err.code : `not a GatewayError: ${String(err)}`
  }
}

t.test('well-formed ES256 and EdDSA proofs parse and verify', async t => {
  for (const alg of ['ES256', 'EdDSA'] as const) {
    const key = createProofKey(alg)
    const proof = key.proof(claims())
    const parsed = parseProof(proof)
    t.equal(parsed.alg, alg)
    t.equal(jwkThumbprint(parsed.jwk), key.jkt, `${alg}: RFC 7638 thumbprint`)
    t.equal(jwkThumbprint(parsed.jwk), await calculateJwkThumbprint(key.jwk, 'sha256'), `${alg}: same as jose`)
    t.same(checkProof(proof, ctx()), { jkt: key.jkt, jti: parsed.jti, iat: now })
  }
  // Any text is a jti, astral characters (surrogate pairs) included.
  const key = createProofKey()
  t.equal(checkProof(key.proof(claims({ jti: 'jti-\u{1F980}' })), ctx()).jti, 'jti-\u{1F980}')
})

t.test('malformed proofs: DPOP_PROOF_INVALID (RFC 9449 §4.3 steps 2-7)', async t => {
  const key = createProofKey('ES256')
  const ed = createProofKey('EdDSA')
  const good = key.proof(claims())
  const [h = '', p = '', s = ''] = good.split('.')
  const cases: Array<[string, string]> = [
    ['two parts', `${h}.${p}`],
    ['four parts', `${good}.x`],
    ['header not base64url', `${h}!.${p}.${s}`],
    ['header not JSON', `${Buffer.from('{nope').toString('base64url')}.${p}.${s}`],
    ['header an array', `${b64([1])}.${p}.${s}`],
    ['typ missing', key.proof(claims(), { typ: undefined })],
    ['typ JWT', key.proof(claims(), { typ: 'JWT' })],
    ['typ upper case', key.proof(claims(), { typ: 'DPOP+JWT' })],
    ['alg none', `${b64({ typ: 'dpop+jwt', alg: 'none', jwk: key.jwk })}.${p}.`],
    ['alg HS256', (() => {
      const input = `${b64({ typ: 'dpop+jwt', alg: 'HS256', jwk: key.jwk })}.${p}`
      return `${input}.${createHmac('sha256', randomBytes(32)).update(input).digest('base64url')}`
    })()],
    ['alg RS256', key.proof(claims(), { alg: 'RS256' })],
    ['private key in jwk', key.proof(claims(), { jwk: key.privateJwk })],
    ['private Ed25519 key in jwk', ed.proof(claims(), { jwk: ed.privateJwk })],
    ['unknown jwk member', key.proof(claims(), { jwk: { ...key.jwk, x5c: ['MII'] } })],
    ['RSA member in jwk', key.proof(claims(), { jwk: { ...key.jwk, p: 'abc' } })],
    ['jwk missing', key.proof(claims(), { jwk: undefined })],
    ['jwk a string', key.proof(claims(), { jwk: 'key' })],
    ['ES256 with an OKP key', key.proof(claims(), { jwk: ed.jwk })],
    ['EdDSA with an EC key', ed.proof(claims(), { jwk: key.jwk })],
    ['EC key on another curve', key.proof(claims(), { jwk: { ...key.jwk, crv: 'P-384' } })],
    ['short x', key.proof(claims(), { jwk: { ...key.jwk, x: 'abc' } })],
    ['y missing', key.proof(claims(), { jwk: { kty: 'EC', crv: 'P-256', x: key.jwk['x'] } })],
    ['OKP with y', ed.proof(claims(), { jwk: { ...ed.jwk, y: ed.jwk['x'] } })],
    ['extra header member (crit)', key.proof(claims(), { crit: ['exp'] })],
    ['extra header member (kid)', key.proof(claims(), { kid: 'k1' })],
    ['jti missing', key.proof(claims({ jti: undefined }))],
    ['jti empty', key.proof(claims({ jti: '' }))],
    ['jti huge', key.proof(claims({ jti: 'x'.repeat(500) }))],
    ['jti with NUL', key.proof(claims({ jti: 'a\u0000b' }))],
    ['jti with a lone surrogate', key.proof(claims({ jti: 'a\ud800b' }))],
    ['htm missing', key.proof(claims({ htm: undefined }))],
    ['htu missing', key.proof(claims({ htu: undefined }))],
    ['iat a string', key.proof(claims({ iat: String(now) }))],
    ['ath a number', key.proof(claims({ ath: 1 }))],
    ['nonce a number', key.proof(claims({ nonce: 1 }))],
    ['payload not an object', `${h}.${b64('str')}.${s}`],
    ['signature not base64url', `${h}.${p}.${s}+`],
    ['signature too short', `${h}.${p}.${s.slice(0, 40)}`],
    ['signature of other content', `${h}.${b64(claims())}.${s}`],
    ['too long', key.proof(claims({ pad: 'x'.repeat(5000) }))]
  ]
  for (const [name, proof] of cases) t.equal(codeOf(() => checkProof(proof, ctx())), 'DPOP_PROOF_INVALID', name)
  // Not a point on P-256: the key does not even import.
  const offCurve = key.proof(claims(), { jwk: { ...key.jwk, y: key.jwk['x'] } })
  t.equal(codeOf(() => checkProof(offCurve, ctx())), 'DPOP_PROOF_INVALID', 'point not on the curve')
})

t.test('the header itself: missing, or more than one', async t => {
  const key = createProofKey()
  t.equal(codeOf(() => checkProof(undefined, ctx())), 'DPOP_PROOF_MISSING')
  t.equal(codeOf(() => checkProof('', ctx())), 'DPOP_PROOF_MISSING')
  t.equal(codeOf(() => checkProof(`${key.proof(claims())}, ${key.proof(claims())}`, ctx())), 'DPOP_MULTIPLE_PROOFS', 'joined by Node')
  t.equal(codeOf(() => checkProof([key.proof(claims()), key.proof(claims())], ctx())), 'DPOP_MULTIPLE_PROOFS', 'as an array')
})

t.test('the proof must match the request (steps 8-12)', async t => {
  const key = createProofKey()
  const other = createProofKey()
  const token = 'eyJ.access.token'
  const resource = ctx({ accessToken: token, boundJkt: key.jkt })
  const withAth = (extra: Record<string, unknown> = {}): string => key.proof(claims({ ath: accessTokenHash(token), ...extra }))
  t.equal(codeOf(() => checkProof(withAth(), resource)), undefined, 'the matching proof')
  t.equal(codeOf(() => checkProof(withAth({ htm: 'POST' }), resource)), 'DPOP_METHOD_MISMATCH')
  t.equal(codeOf(() => checkProof(withAth({ htm: 'get' }), resource)), 'DPOP_METHOD_MISMATCH', 'methods are case-sensitive')
  t.equal(codeOf(() => checkProof(withAth({ htu: 'https://gw.example/fhir/Patient/2' }), resource)), 'DPOP_URL_MISMATCH')
  t.equal(codeOf(() => checkProof(withAth({ htu: 'https://other.example/fhir/Patient/1' }), resource)), 'DPOP_URL_MISMATCH')
  t.equal(codeOf(() => checkProof(withAth({ htu: 'http://gw.example/fhir/Patient/1' }), resource)), 'DPOP_URL_MISMATCH')
  t.equal(codeOf(() => checkProof(withAth({ htu: 'not a url' }), resource)), 'DPOP_URL_MISMATCH')
  t.equal(codeOf(() => checkProof(withAth({ htu: 'HTTPS://GW.example:443/fhir/Patient/1?_format=json#x' }), resource)), undefined, 'normalised, query ignored')
  t.equal(codeOf(() => checkProof(withAth({ iat: now - 61 }), resource)), 'DPOP_PROOF_STALE', 'too old')
  t.equal(codeOf(() => checkProof(withAth({ iat: now + 61 }), resource)), 'DPOP_PROOF_STALE', 'from the future')
  t.equal(codeOf(() => checkProof(withAth({ iat: now - 60 }), resource)), undefined, 'edge of the window')
  t.equal(codeOf(() => checkProof(key.proof(claims()), resource)), 'DPOP_ATH_MISMATCH', 'ath missing')
  t.equal(codeOf(() => checkProof(withAth({ ath: accessTokenHash('another token') }), resource)), 'DPOP_ATH_MISMATCH')
  t.equal(codeOf(() => checkProof(other.proof(claims({ ath: accessTokenHash(token) })), resource)), 'DPOP_KEY_MISMATCH')
})

t.test('RFC 9449 §7.1 example: ath of the access token', async t => {
  t.equal(accessTokenHash('Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU'), 'fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo')
})

t.test('htu normalisation (RFC 3986 §6.2.2, §6.2.3)', async t => {
  const cases: Array<[string, string | undefined]> = [
    ['https://gw.example/fhir', 'https://gw.example/fhir'],
    ['HTTPS://GW.EXAMPLE/fhir', 'https://gw.example/fhir'],
    ['https://gw.example:443/fhir', 'https://gw.example/fhir'],
    ['http://gw.example:80/fhir', 'http://gw.example/fhir'],
    ['https://gw.example:8443/fhir', 'https://gw.example:8443/fhir'],
    ['https://gw.example', 'https://gw.example/'],
    ['https://gw.example/fhir?x=1#f', 'https://gw.example/fhir'],
    ['https://gw.example/%7euser/%41', 'https://gw.example/~user/A'],
    ['https://gw.example/a%2fb', 'https://gw.example/a%2Fb'],
    ['https://gw.example/a/./b/../c', 'https://gw.example/a/c'],
    ['https://user:pw@gw.example/fhir', undefined],
    ['ftp://gw.example/fhir', undefined],
    ['/fhir', undefined]
  ]
  for (const [input, expected] of cases) t.equal(normaliseHtu(input), expected, input)
})

t.test('stateless nonces: every instance with the key agrees; old ones expire', async t => {
  const kek = randomBytes(32)
  let clock = 1_800_000_000_000
  const a = new DpopNonces(kek, () => clock)
  const b = new DpopNonces(kek, () => clock)
  const stranger = new DpopNonces(randomBytes(32), () => clock)
  const nonce = a.current()
  t.ok(b.accepts(nonce), 'another instance accepts it')
  t.notOk(stranger.accepts(nonce), 'another key does not')
  t.notOk(a.accepts(undefined))
  t.notOk(a.accepts('made-up'))
  clock += 5 * 60_000
  t.ok(a.accepts(nonce), 'the previous window still counts')
  t.not(a.current(), nonce, 'a new nonce per window')
  clock += 5 * 60_000
  t.notOk(a.accepts(nonce), 'two windows later it is refused')
  const key = createProofKey()
  const context = ctx({ nonces: a })
  t.equal(codeOf(() => checkProof(key.proof(claims()), context)), 'DPOP_NONCE_REQUIRED')
  t.equal(codeOf(() => checkProof(key.proof(claims({ nonce: 'stale' })), context)), 'DPOP_NONCE_REQUIRED')
  t.equal(codeOf(() => checkProof(key.proof(claims({ nonce: a.current() })), context)), undefined)
})
