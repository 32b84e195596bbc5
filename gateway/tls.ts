import { readFileSync } from 'node:fs'
import type { SecureContextOptions, TlsOptions } from 'node:tls'
import type { GatewayConfig } from '../shared/config.js'

export interface GatewayTlsOptions extends TlsOptions {
  readonly cert: Buffer
  readonly key: Buffer
  readonly ca: Buffer
}

// Mutual TLS with the verdict left to the HTTP layer: requestCert asks every client for
// its certificate and OpenSSL verifies it against the client CA, but rejectUnauthorized is
// off so a missing or untrusted certificate gets a coded 401 problem instead of an alert
// the browser shows as a bare connection error (nginx's `ssl_verify_client optional`).
// gateway/identity.ts refuses every request on a socket that is not `authorized`.
export function loadTlsOptions (config: GatewayConfig): GatewayTlsOptions {
  return {
    cert: readFileSync(config.tls.certFile),
    key: readFileSync(config.tls.keyFile),
    ca: readFileSync(config.tls.clientCaFile),
    requestCert: true,
    rejectUnauthorized: false,
    minVersion: 'TLSv1.2'
  } satisfies SecureContextOptions & TlsOptions
}
