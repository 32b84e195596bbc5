import { X509Certificate, createPrivateKey } from 'node:crypto'
import type { KeyObject } from 'node:crypto'
import type { ConfigProblem } from '../../shared/config.js'
import { parseCaBundle, readPemFile } from '../../shared/certificates.js'
import { isGatewayError } from '../../shared/errors.js'
import { formatTime } from '../output.js'

export interface TlsPaths {
  readonly certFile: string | undefined
  readonly keyFile: string | undefined
  readonly clientCaFile: string | undefined
}

// Runs `parse` and turns a failure into a problem for `variable`; the messages name the
// file and what is wrong with it, never its contents (the key file is a secret).
async function attempt<T> (problems: ConfigProblem[], variable: string, parse: () => Promise<T>, fallback: string): Promise<T | undefined> {
  try {
    return await parse()
  } catch (err) {
    problems.push({ variable, message: isGatewayError(err) && err.code === 'FILE_UNREADABLE' ? err.message : fallback })
    return undefined
  }
}

// What the gateway's TLS listener would trip over at start, found before it starts.
// `paths` are absolute.
export async function tlsFileProblems (paths: TlsPaths, now: Date): Promise<ConfigProblem[]> {
  const problems: ConfigProblem[] = []
  let cert: X509Certificate | undefined
  let key: KeyObject | undefined
  const { certFile, keyFile, clientCaFile } = paths
  if (certFile !== undefined) {
    cert = await attempt(problems, 'TLS_CERT_FILE', async () => new X509Certificate(await readPemFile(certFile)),
      `'${certFile}' does not hold a PEM certificate`)
    if (cert !== undefined && new Date(cert.validTo).getTime() <= now.getTime()) {
      problems.push({ variable: 'TLS_CERT_FILE', message: `the certificate in '${certFile}' expired on ${formatTime(new Date(cert.validTo))}` })
    }
  }
  if (keyFile !== undefined) {
    key = await attempt(problems, 'TLS_KEY_FILE', async () => createPrivateKey(await readPemFile(keyFile)),
      `'${keyFile}' does not hold an unencrypted PEM private key`)
  }
  if (cert !== undefined && key !== undefined && !cert.checkPrivateKey(key)) {
    problems.push({ variable: 'TLS_KEY_FILE', message: `the key in '${keyFile ?? ''}' does not match the certificate in TLS_CERT_FILE` })
  }
  if (clientCaFile !== undefined) {
    await attempt(problems, 'TLS_CLIENT_CA_FILE', async () => parseCaBundle(await readPemFile(clientCaFile), clientCaFile),
      `'${clientCaFile}' does not hold a bundle of PEM CA certificates`)
  }
  return problems
}
