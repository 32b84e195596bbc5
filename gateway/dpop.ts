import { createHmac, createPublicKey, hash, hkdfSync, verify } from 'node:crypto'
import type { KeyObject } from 'node:crypto'
import { GatewayError } from '../shared/errors.js'
import { Lru } from './lru.js'

// RFC 9449 DPoP proofs, checked by hand with node:crypto: every proof is new, so nothing can
// be cached but the key, and jose's WebCrypto path costs ~250 µs a call here.

export const DPOP_ALGS = ['ES256', 'EdDSA'] as const
export type DpopAlg = (typeof DPOP_ALGS)[number]
// RFC 9449 §7.1: challenges name the algorithms a proof may use.
export const DPOP_ALGS_PARAM = `algs="${DPOP_ALGS.join(' ')}"`

export interface PublicJwk {
  readonly kty: 'EC' | 'OKP'
  readonly crv: 'P-256' | 'Ed25519'
  readonly x: string
  readonly y?: string
}

export interface ParsedProof {
  readonly alg: DpopAlg
  readonly jwk: PublicJwk
  readonly signingInput: string
  readonly signature: Buffer
  readonly jti: string
  readonly htm: string
  readonly htu: string
  readonly iat: number
  readonly ath: string | undefined
  readonly nonce: string | undefined
}

const B64URL = /^[A-Za-z0-9_-]+$/
const COORDINATE = /^[A-Za-z0-9_-]{43}$/ // 32 bytes, base64url without padding
// A proof is a few hundred bytes; anything far larger is not one.
const MAX_PROOF_LENGTH = 4096
const MAX_JTI_LENGTH = 200
// NUL and lone surrogates: text Postgres cannot store, so no replay store could hold the jti.
const NOT_TEXT = /[\0\p{Cs}]/u
const HEADER_MEMBERS = new Set(['typ', 'alg', 'jwk'])
// Public members of EC and OKP keys, plus the JWK parameters WebCrypto and libraries add
// (RFC 7517 §4). `d` and every other private or unknown member is refused (§4.3 step 7).
const JWK_MEMBERS = new Set(['kty', 'crv', 'x', 'y', 'kid', 'alg', 'use', 'key_ops', 'ext'])

const invalid = (reason: string): GatewayError => new GatewayError('DPOP_PROOF_INVALID', [reason])

function decodeJson (part: string, what: string): Record<string, unknown> {
  if (!B64URL.test(part)) throw invalid(`${what} is not base64url`)
  let value: unknown
  try {
    value = JSON.parse(Buffer.from(part, 'base64url').toString('utf8'))
  } catch {
    throw invalid(`${what} is not JSON`)
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw invalid(`${what} is not a JSON object`)
  return value as Record<string, unknown>
}

function parseJwk (value: unknown, alg: DpopAlg): PublicJwk {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw invalid('jwk header missing')
  const jwk = value as Record<string, unknown>
  if ('d' in jwk) throw invalid('jwk holds a private key')
  for (const member of Object.keys(jwk)) if (!JWK_MEMBERS.has(member)) throw invalid(`jwk member ${member} not allowed`)
  const { kty, crv, x, y } = jwk
  if (typeof x !== 'string' || !COORDINATE.test(x)) throw invalid('jwk x malformed')
  if (alg === 'ES256') {
    if (kty !== 'EC' || crv !== 'P-256') throw invalid('ES256 needs an EC P-256 key')
    if (typeof y !== 'string' || !COORDINATE.test(y)) throw invalid('jwk y malformed')
    return { kty, crv, x, y }
  }
  if (kty !== 'OKP' || crv !== 'Ed25519' || y !== undefined) throw invalid('EdDSA needs an OKP Ed25519 key')
  return { kty, crv, x }
}

// RFC 9449 §4.3 steps 2-5 and 7: a well-formed proof JWT with the required claims, typ
// dpop+jwt, an allow-listed asymmetric alg and a public key. Pure: no clock, no request.
export function parseProof (text: string): ParsedProof {
  if (text.length > MAX_PROOF_LENGTH) throw invalid('too long')
  const parts = text.split('.')
  if (parts.length !== 3) throw invalid('not a compact JWS')
  const [h = '', p = '', s = ''] = parts
  const header = decodeJson(h, 'header')
  for (const member of Object.keys(header)) if (!HEADER_MEMBERS.has(member)) throw invalid(`header member ${member} not allowed`)
  // Exact match: RFC 9449 §4.2 registers the media type in lower case.
  if (header['typ'] !== 'dpop+jwt') throw invalid('typ must be dpop+jwt')
  const alg = header['alg']
  if (alg !== 'ES256' && alg !== 'EdDSA') throw invalid('alg must be ES256 or EdDSA')
  const jwk = parseJwk(header['jwk'], alg)
  const payload = decodeJson(p, 'payload')
  const { jti, htm, htu, iat, ath, nonce } = payload
  if (typeof jti !== 'string' || jti.length === 0 || jti.length > MAX_JTI_LENGTH || NOT_TEXT.test(jti)) throw invalid('jti missing or malformed')
  if (typeof htm !== 'string' || htm.length === 0) throw invalid('htm missing')
  if (typeof htu !== 'string' || htu.length === 0) throw invalid('htu missing')
  if (typeof iat !== 'number' || !Number.isFinite(iat)) throw invalid('iat missing')
  if (ath !== undefined && typeof ath !== 'string') throw invalid('ath malformed')
  if (nonce !== undefined && typeof nonce !== 'string') throw invalid('nonce malformed')
  if (!B64URL.test(s)) throw invalid('signature is not base64url')
  const signature = Buffer.from(s, 'base64url')
  // ES256 as JWS uses the fixed-width r||s form (RFC 7518 §3.4); Ed25519 signatures are 64 bytes too.
  if (signature.length !== 64) throw invalid('signature has the wrong length')
  return { alg, jwk, signingInput: `${h}.${p}`, signature, jti, htm, htu, iat, ath, nonce }
}

// RFC 7638 §3.2: the required members only, in lexicographic order, no whitespace.
function canonicalJwk (jwk: PublicJwk): string {
  return jwk.kty === 'EC'
    ? `{"crv":"${jwk.crv}","kty":"EC","x":"${jwk.x}","y":"${jwk.y ?? ''}"}`
    : `{"crv":"${jwk.crv}","kty":"OKP","x":"${jwk.x}"}`
}

// One-shot crypto.hash: createHash builds a Hash object per call, a third of the cost here.
export function jwkThumbprint (jwk: PublicJwk): string {
  return hash('sha256', canonicalJwk(jwk), 'base64url')
}

// RFC 9449 §4.2 ath / §6.1: base64url SHA-256 of the access token as sent.
export function accessTokenHash (token: string): string {
  return hash('sha256', token, 'base64url')
}

const UNRESERVED = /^[A-Za-z0-9._~-]$/

// RFC 9449 §4.3 step 9 compares URIs after RFC 3986 §6.2.2/§6.2.3 normalisation: case of
// scheme and host, default port, dot segments (WHATWG URL does these), upper-case
// percent-encoding, and decoded unreserved characters. Query and fragment are ignored.
export function normaliseHtu (text: string): string | undefined {
  let url: URL
  try {
    url = new URL(text)
  } catch {
    return undefined
  }
  if ((url.protocol !== 'https:' && url.protocol !== 'http:') || url.username !== '' || url.password !== '') return undefined
  const path = url.pathname.replace(/%([0-9A-Fa-f]{2})/g, (_m, hex: string) => {
    const c = String.fromCharCode(parseInt(hex, 16))
    return UNRESERVED.test(c) ? c : `%${hex.toUpperCase()}`
  })
  return url.origin + path
}

// Proof keys repeat for the life of a page; importing one costs more than verifying with it,
// and its thumbprint is worth keeping too. Keyed by the members the thumbprint covers, which
// are all the key is: `kid`, `alg` and the like do not change what verifies.
interface ProofKey { readonly jkt: string, readonly key: KeyObject | null }
const keys = new Lru<string, ProofKey>(10_000)

function proofKey (jwk: PublicJwk): ProofKey {
  const canonical = canonicalJwk(jwk)
  let found = keys.get(canonical)
  if (found === undefined) {
    let key: KeyObject | null
    try {
      key = createPublicKey({ key: { ...jwk }, format: 'jwk' })
    } catch {
      key = null // not a point on the curve, or not a key at all
    }
    found = { jkt: jwkThumbprint(jwk), key }
    keys.set(canonical, found)
  }
  return found
}

function verifyProofSignature (proof: ParsedProof, key: KeyObject): boolean {
  const data = Buffer.from(proof.signingInput)
  return proof.alg === 'ES256'
    ? verify('sha256', data, { key, dsaEncoding: 'ieee-p1363' }, proof.signature)
    : verify(null, data, key, proof.signature)
}

// RFC 9449 §8/§9 nonces without shared state: an HMAC of the current time window under a key
// every instance derives from TOKEN_KEY_ENCRYPTION_KEY. The current and previous windows'
// nonces are accepted, so a nonce lives 5 to 10 minutes.
const NONCE_WINDOW_MS = 5 * 60_000

export class DpopNonces {
  readonly #key: Buffer
  readonly #now: () => number
  #window = -1
  #current = ''
  #previous = ''

  constructor (kek: Buffer, now: () => number) {
    this.#key = Buffer.from(hkdfSync('sha256', kek, Buffer.alloc(0), 'ehr-gateway dpop-nonce v1', 32))
    this.#now = now
  }

  #nonce (window: number): string {
    return createHmac('sha256', this.#key).update(String(window)).digest('base64url')
  }

  #refresh (): void {
    const window = Math.floor(this.#now() / NONCE_WINDOW_MS)
    if (window === this.#window) return
    this.#window = window
    this.#current = this.#nonce(window)
    this.#previous = this.#nonce(window - 1)
  }

  current (): string {
    this.#refresh()
    return this.#current
  }

  accepts (nonce: string | undefined): boolean {
    this.#refresh()
    return nonce !== undefined && (nonce === this.#current || nonce === this.#previous)
  }
}

export interface ProofContext {
  readonly method: string
  // The URL the client addressed: the gateway's public URL plus the request path.
  readonly url: string
  readonly nowSeconds: number
  readonly maxAgeSeconds: number
  // On resource requests: the token as sent (ath) and the key it is bound to (cnf.jkt).
  readonly accessToken?: string
  readonly boundJkt?: string
  readonly nonces?: DpopNonces
}

export interface CheckedProof { readonly jkt: string, readonly jti: string, readonly iat: number }

// RFC 9449 §4.3, all but the replay check (step 11's jti), which needs the shared store.
// `value` is the DPoP header as Node gives it: repeated headers arrive joined by ", ".
export function checkProof (value: string | readonly string[] | undefined, ctx: ProofContext): CheckedProof {
  if (value === undefined || value === '') throw new GatewayError('DPOP_PROOF_MISSING', ['this request needs a DPoP proof in the DPoP header'])
  // Step 1; a compact JWS holds neither a comma nor a space.
  if (typeof value !== 'string' || value.includes(',')) throw new GatewayError('DPOP_MULTIPLE_PROOFS')
  const proof = parseProof(value)
  const { jkt, key } = proofKey(proof.jwk)
  if (key === null || !verifyProofSignature(proof, key)) throw invalid('signature does not verify')
  if (proof.htm !== ctx.method) throw new GatewayError('DPOP_METHOD_MISMATCH')
  // The exact URL is the usual case; normalising both (two URL parses) only when it differs.
  if (proof.htu !== ctx.url) {
    const expected = normaliseHtu(ctx.url)
    if (expected === undefined || normaliseHtu(proof.htu) !== expected) throw new GatewayError('DPOP_URL_MISMATCH', [expected ?? ctx.url])
  }
  if (Math.abs(ctx.nowSeconds - proof.iat) > ctx.maxAgeSeconds) throw new GatewayError('DPOP_PROOF_STALE', [ctx.maxAgeSeconds])
  if (ctx.accessToken !== undefined && proof.ath !== accessTokenHash(ctx.accessToken)) throw new GatewayError('DPOP_ATH_MISMATCH')
  if (ctx.boundJkt !== undefined && jkt !== ctx.boundJkt) throw new GatewayError('DPOP_KEY_MISMATCH')
  // Last: a client that gets use_dpop_nonce retries with a nonce, so everything else should
  // already have been right.
  if (ctx.nonces !== undefined && !ctx.nonces.accepts(proof.nonce)) throw new GatewayError('DPOP_NONCE_REQUIRED')
  return { jkt, jti: proof.jti, iat: proof.iat }
}
