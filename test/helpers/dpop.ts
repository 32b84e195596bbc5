import { createHash, generateKeyPairSync, randomBytes, sign } from 'node:crypto'
import type { KeyObject } from 'node:crypto'

// A client's DPoP key and proofs, signed with node:crypto independently of the gateway's code.
export interface ProofKey {
  readonly alg: 'ES256' | 'EdDSA'
  readonly jwk: Record<string, string>
  readonly privateJwk: Record<string, string>
  readonly privateKey: KeyObject
  // The RFC 7638 thumbprint, computed here on its own.
  readonly jkt: string
  proof(claims: Record<string, unknown>, header?: Record<string, unknown>): string
}

const b64 = (value: unknown): string => Buffer.from(JSON.stringify(value)).toString('base64url')

export function createProofKey (alg: 'ES256' | 'EdDSA' = 'ES256'): ProofKey {
  const { privateKey, publicKey } = alg === 'ES256' ? generateKeyPairSync('ec', { namedCurve: 'P-256' }) : generateKeyPairSync('ed25519')
  const full = publicKey.export({ format: 'jwk' }) as Record<string, string>
  const jwk: Record<string, string> = alg === 'ES256' ? { kty: 'EC', crv: 'P-256', x: full['x'] ?? '', y: full['y'] ?? '' } : { kty: 'OKP', crv: 'Ed25519', x: full['x'] ?? '' }
  const canonical = alg === 'ES256' ? `{"crv":"P-256","kty":"EC","x":"${jwk.x}","y":"${jwk['y'] ?? ''}"}` : `{"crv":"Ed25519","kty":"OKP","x":"${jwk.x}"}`
  return {
    alg,
    jwk,
    privateJwk: privateKey.export({ format: 'jwk' }) as Record<string, string>,
    privateKey,
    jkt: createHash('sha256').update(canonical).digest('base64url'),
    proof (claims, header = {}) {
      const input = `${b64({ typ: 'dpop+jwt', alg, jwk, ...header })}.${b64(claims)}`
      const signature = alg === 'ES256'
        ? sign('sha256', Buffer.from(input), { key: privateKey, dsaEncoding: 'ieee-p1363' })
        : sign(null, Buffer.from(input), privateKey)
      return `${input}.${signature.toString('base64url')}`
    }
  }
}

export const newJti = (): string => randomBytes(16).toString('base64url')
export const ath = (token: string): string => createHash('sha256').update(token).digest('base64url')
