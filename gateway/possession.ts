import type { FastifyReply, FastifyRequest } from 'fastify'
import type { GatewayConfig } from '../shared/config.js'
import { GatewayError } from '../shared/errors.js'
import type { ErrorCode } from '../shared/errors.js'
import { DPOP_ALGS_PARAM, checkProof } from './dpop.js'
import type { DpopNonces } from './dpop.js'
import type { ReplayStore } from './replay.js'
import type { AccessTokenClaims } from './tokens.js'

export type Scheme = 'Bearer' | 'DPoP'

// Codes that mean "the proof", answered with invalid_dpop_proof (RFC 9449 §5, §7.1).
const PROOF_CODES: ReadonlySet<ErrorCode> = new Set([
  'DPOP_PROOF_MISSING', 'DPOP_MULTIPLE_PROOFS', 'DPOP_PROOF_INVALID', 'DPOP_METHOD_MISMATCH', 'DPOP_URL_MISMATCH',
  'DPOP_PROOF_STALE', 'DPOP_ATH_MISMATCH', 'DPOP_KEY_MISMATCH', 'DPOP_PROOF_REPLAYED'
])

// The proof-of-possession side of request path step 3: DPoP proofs (RFC 9449) at the token
// endpoint and on every proxied request, single-use Bearer tokens, and the one shared
// replay store both consume from.
export class Possession {
  readonly #replay: ReplayStore
  readonly #nonces: DpopNonces | undefined
  readonly #publicUrl: string
  readonly #tokenUrl: string
  readonly #maxAgeSeconds: number
  readonly #toleranceSeconds: number
  readonly #now: () => number
  readonly requireDpop: boolean
  readonly singleUse: boolean

  constructor (config: GatewayConfig, replay: ReplayStore, nonces: DpopNonces | undefined, now: () => number) {
    this.#replay = replay
    this.#nonces = nonces
    this.#publicUrl = config.gateway.publicUrl
    this.#tokenUrl = `${config.gateway.publicUrl}/v1/token`
    this.#maxAgeSeconds = config.dpop.maxAgeSeconds
    this.#toleranceSeconds = config.tokens.clockToleranceSeconds
    this.#now = now
    this.requireDpop = config.tokens.requireDpop
    this.singleUse = config.tokens.singleUse
  }

  // RFC 9449 §8.2/§9: a fresh nonce may come with any response; clients keep the latest.
  offerNonce (reply: FastifyReply): void {
    if (this.#nonces !== undefined) reply.header('dpop-nonce', this.#nonces.current())
  }

  // POST /v1/token: the thumbprint to bind the token to, or undefined for a Bearer token.
  // Refusals are 400 here (RFC 9449 §5 via RFC 6749 §5.2).
  async tokenRequestKey (request: FastifyRequest): Promise<string | undefined> {
    const value = request.headers.dpop
    if (value === undefined && !this.requireDpop) return undefined
    try {
      if (value === undefined) throw new GatewayError('DPOP_PROOF_MISSING', ['TOKEN_REQUIRE_DPOP: a token request needs a DPoP proof'])
      const proof = checkProof(value, { method: request.method, url: this.#tokenUrl, ...this.#window(), ...this.#nonceCheck() })
      await this.#consumeProof(proof.jkt, proof.jti, proof.iat)
      return proof.jkt
    } catch (err) {
      if (!(err instanceof GatewayError)) throw err
      throw err.withHeaders(this.#nonceHeader(err.code), err.statusCode === 401 ? 400 : err.statusCode)
    }
  }

  // Proxied requests, after the token's signature and bindings to machine and IP.
  async checkResource (request: FastifyRequest, scheme: Scheme, token: string, claims: AccessTokenClaims): Promise<void> {
    try {
      if (scheme === 'DPoP') {
        // RFC 9449 §7.1: the DPoP scheme is for tokens bound to a key; an unbound token has no
        // key a proof could match.
        if (claims.cnf.jkt === undefined) throw new GatewayError('DPOP_KEY_MISMATCH')
        const path = request.raw.url ?? '/'
        const q = path.indexOf('?')
        const proof = checkProof(request.headers.dpop, {
          method: request.method,
          url: this.#publicUrl + (q === -1 ? path : path.slice(0, q)),
          ...this.#window(),
          accessToken: token,
          boundJkt: claims.cnf.jkt,
          ...this.#nonceCheck()
        })
        await this.#consumeProof(proof.jkt, proof.jti, proof.iat)
        return
      }
      // RFC 9449 §7.2: a DPoP-bound token is never accepted as a Bearer token.
      if (claims.cnf.jkt !== undefined) throw new GatewayError('TOKEN_DPOP_BOUND')
      if (this.requireDpop) throw new GatewayError('DPOP_REQUIRED')
      if (this.singleUse) {
        // Remembered until the token would be refused as expired anyway.
        const fresh = await this.#replay.consume(`token:${claims.jti}`, (claims.exp + this.#toleranceSeconds + 1) * 1000)
        if (!fresh) throw new GatewayError('TOKEN_REPLAYED')
      }
    } catch (err) {
      if (!(err instanceof GatewayError) || err.statusCode !== 401) throw err
      throw err.withHeaders({ ...this.challenge(scheme, err.code), ...this.#nonceHeader(err.code) })
    }
  }

  // RFC 9449 §7.1 / RFC 6750 §3 challenge for a refusal. No scheme: the Authorization header
  // is missing (no code) or unusable (a code): offer both schemes, or DPoP alone.
  challenge (scheme: Scheme | undefined, code?: ErrorCode): Record<string, string> {
    const dpop = (error?: string): string => error === undefined ? `DPoP ${DPOP_ALGS_PARAM}` : `DPoP error="${error}", ${DPOP_ALGS_PARAM}`
    if (scheme === undefined) {
      const error = code === undefined ? undefined : 'invalid_request'
      const bearer = error === undefined ? 'Bearer realm="ehr-gateway"' : `Bearer realm="ehr-gateway", error="${error}"`
      return { 'www-authenticate': this.requireDpop ? dpop(error) : `${bearer}, ${dpop(error)}` }
    }
    if (code === 'DPOP_NONCE_REQUIRED') return { 'www-authenticate': dpop('use_dpop_nonce') }
    if (code !== undefined && PROOF_CODES.has(code)) return { 'www-authenticate': dpop('invalid_dpop_proof') }
    if (scheme === 'DPoP' || code === 'TOKEN_DPOP_BOUND' || code === 'DPOP_REQUIRED') return { 'www-authenticate': dpop('invalid_token') }
    return { 'www-authenticate': 'Bearer realm="ehr-gateway", error="invalid_token"' }
  }

  #window (): { nowSeconds: number, maxAgeSeconds: number } {
    return { nowSeconds: this.#now() / 1000, maxAgeSeconds: this.#maxAgeSeconds }
  }

  #nonceCheck (): { nonces?: DpopNonces } {
    return this.#nonces === undefined ? {} : { nonces: this.#nonces }
  }

  #nonceHeader (code: ErrorCode): Record<string, string> {
    return code === 'DPOP_NONCE_REQUIRED' && this.#nonces !== undefined ? { 'dpop-nonce': this.#nonces.current() } : {}
  }

  // RFC 9449 §11.1: a jti is refused once seen, by any instance, for as long as its iat
  // keeps the proof acceptable. Scoped by key, so nobody can burn another key's jti.
  async #consumeProof (jkt: string, jti: string, iat: number): Promise<void> {
    const fresh = await this.#replay.consume(`dpop:${jkt}:${jti}`, (Math.ceil(iat) + this.#maxAgeSeconds + 1) * 1000)
    if (!fresh) throw new GatewayError('DPOP_PROOF_REPLAYED')
  }
}
