import { X509Certificate, createPrivateKey } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { createSecureContext } from 'node:tls'
import type { SecureContextOptions, TLSSocket, TlsOptions } from 'node:tls'
import { parseCaBundle } from '../shared/certificates.js'

export interface GatewayTlsOptions extends TlsOptions {
  readonly cert: Buffer
  readonly key: Buffer
  readonly ca: Buffer
}

export interface TlsFiles { readonly certFile: string, readonly keyFile: string, readonly clientCaFile: string }

// The three files as read and checked together: a certificate with the key that belongs to
// it and a client CA bundle that parses. What the TLS listener serves is always one of these.
export interface TlsMaterial {
  readonly cert: Buffer
  readonly key: Buffer
  readonly ca: Buffer
  readonly serverCert: X509Certificate
  readonly clientCas: readonly X509Certificate[]
}

const PEM_CERT = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/

export type TlsBytes = Pick<TlsMaterial, 'cert' | 'key' | 'ca'>

// Errors name the file and what is wrong with it; never the key's bytes.
export function readTlsFiles (files: TlsFiles): TlsBytes {
  const read = (file: string): Buffer => {
    try {
      return readFileSync(file)
    } catch (err) {
      throw new Error(`cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? 'error'})`, { cause: err })
    }
  }
  return { cert: read(files.certFile), key: read(files.keyFile), ca: read(files.clientCaFile) }
}

export function readTlsMaterial (files: TlsFiles): TlsMaterial {
  return checkTlsMaterial(files, readTlsFiles(files))
}

export function sameTlsBytes (a: TlsBytes, b: TlsBytes): boolean {
  return a.cert.equals(b.cert) && a.key.equals(b.key) && a.ca.equals(b.ca)
}

export function checkTlsMaterial (files: TlsFiles, bytes: TlsBytes): TlsMaterial {
  const { cert, key, ca } = bytes
  let serverCert: X509Certificate
  try {
    // The first block is the leaf; any after it are its chain.
    serverCert = new X509Certificate(PEM_CERT.exec(cert.toString('latin1'))?.[0] ?? cert)
  } catch (err) {
    throw new Error(`${files.certFile} does not hold a PEM certificate (incomplete or corrupt)`, { cause: err })
  }
  let privateKey
  try {
    privateKey = createPrivateKey(key)
  } catch (err) {
    throw new Error(`${files.keyFile} does not hold a PEM private key (incomplete, corrupt or encrypted)`, { cause: err })
  }
  // A certificate rotated before its key (or the reverse) is the common half-done rotation.
  if (!serverCert.checkPrivateKey(privateKey)) throw new Error(`${files.keyFile} is not the key of the certificate in ${files.certFile}`)
  let clientCas: X509Certificate[]
  try {
    clientCas = parseCaBundle(ca.toString('latin1'), files.clientCaFile)
  } catch (err) {
    throw new Error(`${files.clientCaFile} does not hold a bundle of PEM CA certificates`, { cause: err })
  }
  const material = { cert, key, ca, serverCert, clientCas }
  try {
    // What OpenSSL itself would refuse (an unsupported key type, a chain it cannot load).
    createSecureContext(secureContextOptions(material))
  } catch (err) {
    throw new Error(`OpenSSL refuses the TLS files: ${err instanceof Error ? err.message : String(err)}`, { cause: err })
  }
  return material
}

// server.setSecureContext() resets every option it is not given, so the listener's
// options and a reload's are built by this one function.
function secureContextOptions (material: TlsBytes) {
  return { cert: material.cert, key: material.key, ca: material.ca, minVersion: 'TLSv1.2' } satisfies SecureContextOptions
}

// Mutual TLS with the verdict left to the HTTP layer: requestCert asks every client for
// its certificate and OpenSSL verifies it against the client CA, but rejectUnauthorized is
// off so a missing or untrusted certificate gets a coded 401 problem instead of an alert
// the browser shows as a bare connection error (nginx's `ssl_verify_client optional`).
// gateway/identity.ts refuses every request on a socket that is not `authorized`.
export function tlsOptions (material: TlsBytes): GatewayTlsOptions {
  return {
    ...secureContextOptions(material),
    requestCert: true,
    rejectUnauthorized: false
  } satisfies SecureContextOptions & TlsOptions
}

export function reloadOptions (material: TlsMaterial): SecureContextOptions {
  return secureContextOptions(material)
}

// Whether a client chain OpenSSL verified at the handshake still leads to a CA of `cas`:
// some certificate of it (the leaf, or an intermediate the client sent) is signed by one.
// Used when the client CA bundle changes under an open connection.
export function chainAnchoredIn (socket: TLSSocket, cas: readonly X509Certificate[]): boolean {
  const chain: X509Certificate[] = []
  const seen = new Set<string>()
  let link = socket.getPeerCertificate(true)
  while (link?.raw !== undefined && !seen.has(link.fingerprint256)) {
    seen.add(link.fingerprint256)
    chain.push(new X509Certificate(link.raw))
    link = link.issuerCertificate
  }
  return chain.some(cert => cas.some(ca => cert.checkIssued(ca) && cert.verify(ca.publicKey)))
}
