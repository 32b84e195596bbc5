import { createCipheriv, createDecipheriv, createPrivateKey, createPublicKey, generateKeyPairSync, randomBytes } from 'node:crypto'
import type { KeyObject } from 'node:crypto'
import { calculateJwkThumbprint } from 'jose'
import type { JWK } from 'jose'
import type { Config } from './config.js'
import type { SigningKeyRow } from './db/signing-keys.js'
import { GatewayError } from './errors.js'

export type SigningAlg = 'EdDSA' | 'ES256'

// How long a retired key keeps verifying: the longest a token it signed can still be
// alive. The gateway and `ehrctl keys list` both ask this one function.
export function verificationGraceSeconds (tokens: Config['tokens']): number {
  return tokens.ttlSeconds + tokens.clockToleranceSeconds
}

// Epoch milliseconds after which tokens signed by this key are refused; Infinity while
// it is the current key.
export function verifiesUntil (row: Pick<SigningKeyRow, 'retiredAt'>, tokens: Config['tokens']): number {
  return row.retiredAt === null ? Infinity : row.retiredAt.getTime() + verificationGraceSeconds(tokens) * 1000
}

// Private keys are stored encrypted under TOKEN_KEY_ENCRYPTION_KEY (AES-256-GCM); the kid
// is the additional authenticated data, so a ciphertext cannot be moved to another row.
function encrypt (kek: Buffer, kid: string, plaintext: Buffer): Buffer {
  const iv = randomBytes(12)
  const cipher = createCipheriv('aes-256-gcm', kek, iv)
  cipher.setAAD(Buffer.from(kid))
  const body = Buffer.concat([cipher.update(plaintext), cipher.final()])
  return Buffer.concat([iv, cipher.getAuthTag(), body])
}

function decrypt (kek: Buffer, kid: string, blob: Buffer): Buffer {
  const decipher = createDecipheriv('aes-256-gcm', kek, blob.subarray(0, 12))
  decipher.setAAD(Buffer.from(kid))
  decipher.setAuthTag(blob.subarray(12, 28))
  return Buffer.concat([decipher.update(blob.subarray(28)), decipher.final()])
}

export async function generateSigningKey (alg: SigningAlg, kek: Buffer): Promise<Omit<SigningKeyRow, 'createdAt' | 'retiredAt'>> {
  const { privateKey, publicKey } = alg === 'EdDSA'
    ? generateKeyPairSync('ed25519')
    : generateKeyPairSync('ec', { namedCurve: 'P-256' })
  const jwk = publicKey.export({ format: 'jwk' }) as JWK
  // RFC 7638 thumbprint as kid: stable, collision-free, derived from the key itself.
  const kid = await calculateJwkThumbprint(jwk, 'sha256')
  const publicJwk: JWK = { ...jwk, kid, alg, use: 'sig' }
  const der = privateKey.export({ format: 'der', type: 'pkcs8' })
  return { kid, alg, publicJwk, privateKeyEncrypted: encrypt(kek, kid, der) }
}

export function decryptPrivateKey (row: SigningKeyRow, kek: Buffer): KeyObject {
  try {
    return createPrivateKey({ key: decrypt(kek, row.kid, row.privateKeyEncrypted), format: 'der', type: 'pkcs8' })
  } catch (err) {
    throw new GatewayError('KEY_DECRYPT_FAILED', [row.kid], { cause: err })
  }
}

export function publicKeyOf (row: SigningKeyRow): KeyObject {
  return createPublicKey({ key: row.publicJwk as import('node:crypto').JsonWebKey, format: 'jwk' })
}
