// tsyringe (used inside @peculiar/x509) needs the Reflect metadata polyfill
// loaded before the library is evaluated, so this import must stay first.
import 'reflect-metadata'
import { KeyObject, randomBytes, webcrypto } from 'node:crypto'
import { mkdir, unlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import * as x509 from '@peculiar/x509'

// Throwaway development PKI for `npm run demo` and the test suite. Every key
// lives only in memory or in a caller-chosen directory; nothing here is ever
// meant to be committed or trusted outside a developer machine.

x509.cryptoProvider.set(webcrypto)

export interface KeyPair { cert: string; key: string }
export interface CertOptions { commonName: string; notBefore?: Date; notAfter?: Date }
export interface ServerCertOptions extends CertOptions { dnsNames?: string[]; ipAddresses?: string[] }
export interface DevCa extends KeyPair {
  issueServer(opts: ServerCertOptions): Promise<KeyPair>
  issueClient(opts: CertOptions): Promise<KeyPair>
}

const KEY_ALGORITHM = { name: 'ECDSA', namedCurve: 'P-256' }
const SIGNING_ALGORITHM = { name: 'ECDSA', hash: 'SHA-256' }
const DEFAULT_CA_NAME = 'ehr-gateway dev CA'
const DAY_MS = 24 * 60 * 60 * 1000

type WebCryptoKeyPair = webcrypto.CryptoKeyPair

async function generateKeys (): Promise<WebCryptoKeyPair> {
  // Extractable so the private key can be exported as PKCS#8 for TLS.
  return await webcrypto.subtle.generateKey(KEY_ALGORITHM, true, ['sign', 'verify'])
}

// 128 random bits with the top bit cleared: always a positive DER INTEGER,
// never zero-length, and unpredictable as RFC 5280 recommends.
function randomSerial (): string {
  const bytes = randomBytes(16)
  bytes[0] = (bytes[0]! & 0x7f) | 0x01
  return bytes.toString('hex')
}

// JSON form keeps commas or '=' in a common name from being parsed as RDN syntax.
function subjectName (commonName: string): x509.JsonName {
  return [{ CN: [commonName] }]
}

// Clock skew between test processes and CI hosts makes "valid from now"
// certificates flaky, so start validity a minute in the past.
function validity (opts: CertOptions): { notBefore: Date; notAfter: Date } {
  const now = Date.now()
  return {
    notBefore: opts.notBefore ?? new Date(now - 60 * 1000),
    notAfter: opts.notAfter ?? new Date(now + 30 * DAY_MS)
  }
}

function exportPrivateKey (key: webcrypto.CryptoKey): string {
  return KeyObject.from(key).export({ type: 'pkcs8', format: 'pem' }).toString()
}

function certToPem (cert: x509.X509Certificate): string {
  // Node's TLS stack accepts CRLF, but LF keeps written files diff-friendly.
  return cert.toString('pem').replace(/\r\n/g, '\n') + '\n'
}

export async function createDevCa (opts?: CertOptions): Promise<DevCa> {
  const caOpts: CertOptions = { commonName: DEFAULT_CA_NAME, ...opts }
  const caKeys = await generateKeys()
  const caSki = await x509.SubjectKeyIdentifierExtension.create(caKeys.publicKey)
  const caName = subjectName(caOpts.commonName)

  const caCert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    name: caName,
    ...validity(caOpts),
    keys: caKeys,
    signingAlgorithm: SIGNING_ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      caSki
    ]
  })

  // Reusing the CA's own SKI value guarantees AKI and SKI match byte for byte,
  // which chain builders rely on to pick the issuer.
  const aki = new x509.AuthorityKeyIdentifierExtension(caSki.keyId)

  async function issue (leafOpts: CertOptions, extensions: x509.Extension[]): Promise<KeyPair> {
    const keys = await generateKeys()
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: randomSerial(),
      subject: subjectName(leafOpts.commonName),
      issuer: caCert.subjectName,
      ...validity(leafOpts),
      publicKey: keys.publicKey,
      signingKey: caKeys.privateKey,
      signingAlgorithm: SIGNING_ALGORITHM,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        ...extensions,
        aki,
        await x509.SubjectKeyIdentifierExtension.create(keys.publicKey)
      ]
    })
    return { cert: certToPem(cert), key: exportPrivateKey(keys.privateKey) }
  }

  return {
    cert: certToPem(caCert),
    key: exportPrivateKey(caKeys.privateKey),

    async issueServer (serverOpts: ServerCertOptions): Promise<KeyPair> {
      const dnsNames = serverOpts.dnsNames ?? ['localhost']
      const ipAddresses = serverOpts.ipAddresses ?? ['127.0.0.1', '::1']
      return await issue(serverOpts, [
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
        new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
        new x509.SubjectAlternativeNameExtension([
          ...dnsNames.map((value) => ({ type: 'dns' as const, value })),
          ...ipAddresses.map((value) => ({ type: 'ip' as const, value }))
        ])
      ])
    },

    async issueClient (clientOpts: CertOptions): Promise<KeyPair> {
      return await issue(clientOpts, [
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
        new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth])
      ])
    }
  }
}

export async function writeKeyPair (dir: string, name: string, pair: KeyPair): Promise<{ certFile: string; keyFile: string }> {
  await mkdir(dir, { recursive: true })
  const certFile = join(dir, `${name}.crt`)
  const keyFile = join(dir, `${name}.key`)
  await writeFile(certFile, pair.cert)
  // `mode` only applies when a file is created, so remove any previous key
  // first rather than write new key material into a file with looser perms.
  await unlink(keyFile).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'ENOENT') throw err
  })
  await writeFile(keyFile, pair.key, { mode: 0o600, flag: 'wx' })
  return { certFile, keyFile }
}
