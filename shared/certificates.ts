import { X509Certificate, createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { GatewayError } from './errors.js'

// RFC 8705 §3.1: x5t#S256 is the base64url SHA-256 of the DER certificate. The registry
// stores the same value, so the token's cnf and the registry key are one thing.
export function certificateThumbprint (der: Buffer): string {
  return createHash('sha256').update(der).digest('base64url')
}

const PEM_CERT = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g

export async function readPemFile (file: string): Promise<string> {
  try {
    return await readFile(file, 'utf8')
  } catch (err) {
    throw new GatewayError('FILE_UNREADABLE', [file, (err as NodeJS.ErrnoException).code ?? 'error'], { cause: err })
  }
}

export function parseCaBundle (pem: string, file: string): X509Certificate[] {
  const blocks = pem.match(PEM_CERT) ?? []
  try {
    const certs = blocks.map(b => new X509Certificate(b))
    if (certs.length === 0) throw new Error('no certificate')
    return certs
  } catch (err) {
    throw new GatewayError('CA_BUNDLE_INVALID', [file], { cause: err })
  }
}

export interface MachineCertificate {
  readonly x509: X509Certificate
  readonly pem: string
  readonly fingerprint: string
}

// What `ehrctl machine add` accepts: exactly one current end-entity certificate that the
// gateway's client CA signed and that may authenticate a TLS client.
export function checkMachineCertificate (pem: string, file: string, caBundle: readonly X509Certificate[], now: Date): MachineCertificate {
  const blocks = pem.match(PEM_CERT) ?? []
  if (blocks.length !== 1) throw new GatewayError('CERT_NOT_PEM', [file])
  let x509: X509Certificate
  try {
    x509 = new X509Certificate(blocks[0] as string)
  } catch (err) {
    throw new GatewayError('CERT_NOT_PEM', [file], { cause: err })
  }
  const notBefore = new Date(x509.validFrom)
  const notAfter = new Date(x509.validTo)
  if (notAfter.getTime() <= now.getTime()) throw new GatewayError('CERT_EXPIRED', [file, `expired on ${notAfter.toISOString()}`])
  if (notBefore.getTime() > now.getTime()) throw new GatewayError('CERT_EXPIRED', [file, `is not valid before ${notBefore.toISOString()}`])
  if (x509.ca) throw new GatewayError('CERT_NOT_FOR_CLIENTS', [file, 'is a CA certificate'])
  const eku = x509.keyUsage
  if (eku !== undefined && eku.length > 0 && !eku.includes('1.3.6.1.5.5.7.3.2')) {
    throw new GatewayError('CERT_NOT_FOR_CLIENTS', [file, 'lacks the TLS client authentication extended key usage'])
  }
  const signed = caBundle.some(ca => x509.checkIssued(ca) && x509.verify(ca.publicKey))
  if (!signed) throw new GatewayError('CERT_NOT_SIGNED_BY_CA', [file])
  return describeCertificate(x509)
}

export function describeCertificate (x509: X509Certificate): MachineCertificate {
  return { x509, pem: x509.toString(), fingerprint: certificateThumbprint(x509.raw) }
}
