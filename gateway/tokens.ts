import { hkdfSync, randomUUID } from 'node:crypto'
import { CompactEncrypt, SignJWT, compactDecrypt, errors as joseErrors, jwtVerify } from 'jose'
import type { JWTHeaderParameters, JWTPayload } from 'jose'
import type { Config } from '../shared/config.js'
import type { Machine } from '../shared/db/machines.js'
import { GatewayError } from '../shared/errors.js'
import { Lru } from './lru.js'
import type { SigningKeys } from './signing-keys.js'

export const TOKEN_TYPE = 'at+jwt' // RFC 9068 §2.1
const ALGORITHMS = ['EdDSA', 'ES256']

export interface AccessTokenClaims {
  readonly iss: string
  readonly aud: string
  readonly sub: string // machine id
  readonly client_id: string // machine name (RFC 9068 §2.2)
  readonly iat: number
  readonly nbf: number
  readonly exp: number
  readonly jti: string
  // RFC 8705 §3.1 certificate binding; RFC 9449 §6.1 jkt when bound to a DPoP key too.
  readonly cnf: { readonly 'x5t#S256': string, readonly jkt?: string }
  readonly ip: string
}

// TOKEN_ENCRYPT's key: derived, never the KEK itself, so one key never serves two purposes.
export function tokenEncryptionKey (kek: Buffer): Uint8Array {
  return new Uint8Array(hkdfSync('sha256', kek, Buffer.alloc(0), 'ehr-gateway token-encryption v1', 32))
}

const JWE_ALGORITHMS = { keyManagementAlgorithms: ['dir'], contentEncryptionAlgorithms: ['A256GCM'] }

export interface IssuedToken { readonly token: string, readonly claims: AccessTokenClaims }

// An IPv4 client seen on a dual-stack socket arrives as ::ffff:a.b.c.d; it is the same
// client and must bind the same.
export function normaliseIp (ip: string): string {
  return ip.startsWith('::ffff:') && ip.includes('.') ? ip.slice(7) : ip
}

export class TokenService {
  readonly #keys: SigningKeys
  readonly #config: Config['tokens']
  readonly #now: () => number
  // Verifying a signature costs ~300 µs through jose's WebCrypto path; a token is reused for
  // many requests, so its verified claims are kept until it expires. Only the signature is
  // cached: expiry, machine, certificate and IP are checked on every request.
  readonly #verified = new Lru<string, { readonly kid: string, readonly claims: AccessTokenClaims }>(10_000)

  // Set: tokens are issued signed then encrypted (a nested JWT, RFC 7519 §11.2) and
  // encrypted tokens are accepted. Unset, only signed tokens are.
  readonly #encryptionKey: Uint8Array | undefined

  constructor (keys: SigningKeys, config: Config['tokens'], now: () => number, encryptionKey?: Uint8Array) {
    this.#keys = keys
    this.#config = config
    this.#now = now
    this.#encryptionKey = encryptionKey
  }

  // `jkt`: the RFC 7638 thumbprint of the client's DPoP key, for a DPoP-bound token.
  async issue (machine: Machine, thumbprint: string, ip: string, jkt?: string): Promise<IssuedToken> {
    const key = this.#keys.current()
    const iat = Math.floor(this.#now() / 1000)
    const claims: AccessTokenClaims = {
      iss: this.#config.issuer,
      aud: this.#config.audience,
      sub: machine.id,
      client_id: machine.name,
      iat,
      nbf: iat,
      exp: iat + this.#config.ttlSeconds,
      jti: randomUUID(),
      cnf: jkt === undefined ? { 'x5t#S256': thumbprint } : { 'x5t#S256': thumbprint, jkt },
      ip: normaliseIp(ip)
    }
    const signed = await new SignJWT({ ...claims })
      .setProtectedHeader({ alg: key.alg, kid: key.kid, typ: TOKEN_TYPE })
      .sign(key.privateKey)
    if (!this.#config.encrypt || this.#encryptionKey === undefined) return { token: signed, claims }
    const token = await new CompactEncrypt(new TextEncoder().encode(signed))
      .setProtectedHeader({ alg: 'dir', enc: 'A256GCM', cty: 'JWT' })
      .encrypt(this.#encryptionKey)
    return { token, claims }
  }

  // The signed JWT inside an encrypted token; GCM's tag makes any change fail here.
  async #decrypt (token: string): Promise<string> {
    if (this.#encryptionKey === undefined) throw new GatewayError('TOKEN_INVALID', ['encrypted tokens are not accepted'])
    try {
      const { plaintext, protectedHeader } = await compactDecrypt(token, this.#encryptionKey, JWE_ALGORITHMS)
      if (protectedHeader.cty !== 'JWT') throw new GatewayError('TOKEN_INVALID', ['encrypted content is not a JWT'])
      return new TextDecoder().decode(plaintext)
    } catch (err) {
      if (err instanceof GatewayError) throw err
      throw new GatewayError('TOKEN_INVALID', ['does not decrypt'], { cause: err })
    }
  }

  // Signature, algorithm, kid, typ, iss, aud and time; the caller checks the bindings.
  async verify (token: string): Promise<AccessTokenClaims> {
    const nowSeconds = this.#now() / 1000
    const cached = this.#verified.get(token)
    if (cached !== undefined) {
      // The key may have been retired out since the signature was checked.
      if (!this.#keys.verifies(cached.kid)) throw new GatewayError('TOKEN_INVALID', ['signed by an unknown or retired key'])
      this.#checkTime(cached.claims, nowSeconds)
      return cached.claims
    }
    // Five parts: a JWE (RFC 7516 §7.1) around the signed token.
    const signed = token.split('.').length === 5 ? await this.#decrypt(token) : token
    let payload: JWTPayload
    let kid: string
    try {
      ({ payload, protectedHeader: { kid = '' } } = await jwtVerify(signed, async (header: JWTHeaderParameters) => {
        const known = header.kid === undefined ? undefined : await this.#keys.verificationKey(header.kid)
        if (known === undefined) throw new GatewayError('TOKEN_INVALID', ['signed by an unknown or retired key'])
        if (known.alg !== header.alg) throw new GatewayError('TOKEN_INVALID', ['algorithm does not match the key'])
        return known.key
      }, {
        algorithms: ALGORITHMS,
        typ: TOKEN_TYPE,
        issuer: this.#config.issuer,
        audience: this.#config.audience,
        clockTolerance: this.#config.clockToleranceSeconds,
        currentDate: new Date(this.#now()),
        requiredClaims: ['sub', 'exp', 'iat', 'jti', 'cnf', 'ip', 'client_id']
      }))
    } catch (err) {
      throw translateJoseError(err)
    }
    const claims = asClaims(payload)
    // A token living longer than we ever issue was not minted by this gateway's code, even
    // if the key signed it (a leaked key): refuse it.
    if (claims.exp - claims.iat > this.#config.ttlSeconds) {
      throw new GatewayError('TOKEN_INVALID', ['lifetime exceeds TOKEN_TTL_SECONDS'])
    }
    this.#verified.set(token, { kid, claims })
    return claims
  }

  #checkTime (claims: AccessTokenClaims, nowSeconds: number): void {
    const tolerance = this.#config.clockToleranceSeconds
    if (nowSeconds - tolerance >= claims.exp) {
      throw new GatewayError('TOKEN_EXPIRED')
    }
    if (nowSeconds + tolerance < claims.nbf) throw new GatewayError('TOKEN_NOT_YET_VALID')
  }
}

function asClaims (payload: JWTPayload): AccessTokenClaims {
  const cnf = payload['cnf'] as Record<string, unknown> | undefined
  const thumbprint = cnf?.['x5t#S256']
  const jkt = cnf?.['jkt']
  if (typeof thumbprint !== 'string' || (jkt !== undefined && typeof jkt !== 'string') || typeof payload['ip'] !== 'string' || typeof payload['client_id'] !== 'string' || typeof payload.aud !== 'string') {
    throw new GatewayError('TOKEN_INVALID', ['required claims are missing or malformed'])
  }
  return {
    iss: payload.iss as string,
    aud: payload.aud,
    sub: payload.sub as string,
    client_id: payload['client_id'],
    iat: payload.iat as number,
    nbf: payload.nbf ?? (payload.iat as number),
    exp: payload.exp as number,
    jti: payload.jti as string,
    cnf: typeof jkt === 'string' ? { 'x5t#S256': thumbprint, jkt } : { 'x5t#S256': thumbprint },
    ip: payload['ip']
  }
}

// STYLE §3: jose's errors become our codes at the boundary, keeping the cause for the log.
export function translateJoseError (err: unknown): GatewayError {
  if (err instanceof GatewayError) return err
  const options = { cause: err }
  if (err instanceof joseErrors.JWTExpired) return new GatewayError('TOKEN_EXPIRED', [], options)
  if (err instanceof joseErrors.JWTClaimValidationFailed) {
    if (err.claim === 'aud') return new GatewayError('TOKEN_WRONG_AUDIENCE', [], options)
    if (err.claim === 'nbf' || err.claim === 'iat') return new GatewayError('TOKEN_NOT_YET_VALID', [], options)
    return new GatewayError('TOKEN_INVALID', [`${err.claim} claim rejected`], options)
  }
  if (err instanceof joseErrors.JOSEAlgNotAllowed) return new GatewayError('TOKEN_INVALID', ['algorithm not allowed'], options)
  if (err instanceof joseErrors.JWSSignatureVerificationFailed) return new GatewayError('TOKEN_INVALID', ['signature does not verify'], options)
  return new GatewayError('TOKEN_INVALID', ['not a well-formed signed JWT'], options)
}
