// RFC 9449 DPoP proofs for the load generator, signed with node:crypto (ES256, a key made
// once per load generator): a fresh proof per request, as a frontend would send.
import { createHash, generateKeyPairSync, randomUUID, sign } from 'node:crypto'
import type { KeyObject } from 'node:crypto'

const b64url = (data: Buffer | string): string => Buffer.from(data).toString('base64url')

export class DpopSigner {
  readonly #key: KeyObject
  readonly #header: string

  constructor () {
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' })
    const { kty, crv, x, y } = publicKey.export({ format: 'jwk' })
    this.#key = privateKey
    // RFC 9449 §4.2: typ dpop+jwt, an asymmetric alg, the public key as a bare JWK.
    this.#header = b64url(JSON.stringify({ typ: 'dpop+jwt', alg: 'ES256', jwk: { kty, crv, x, y } }))
  }

  // `ath` (§4.2) is the access token's SHA-256, for proofs that accompany a token.
  proof (htm: string, htu: string, accessToken?: string): string {
    const claims: Record<string, string | number> = { htm, htu, iat: Math.floor(Date.now() / 1000), jti: randomUUID() }
    if (accessToken !== undefined) claims['ath'] = createHash('sha256').update(accessToken).digest('base64url')
    const input = `${this.#header}.${b64url(JSON.stringify(claims))}`
    // JWS ES256 signatures are r‖s (RFC 7518 §3.4), not DER.
    return `${input}.${sign('sha256', Buffer.from(input), { key: this.#key, dsaEncoding: 'ieee-p1363' }).toString('base64url')}`
  }
}
