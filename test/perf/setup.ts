// What the bench and both perf scripts measure against: a dev CA, the server's key pair and
// one registered workstation under a directory, and the production environment that points a
// gateway at them, the scratch database and the stand-in upstream.
import { X509Certificate, randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { Sql } from 'postgres'
import { createDevCa, writeKeyPair } from '../../gateway/demo/pki.js'
import type { DevCa } from '../../gateway/demo/pki.js'
import { describeCertificate } from '../../shared/certificates.js'
import { loadGatewayConfig } from '../../shared/config.js'
import type { GatewayConfig } from '../../shared/config.js'
import { machineRecord, machinesRepository } from '../../shared/db/machines.js'

export interface PerfPki {
  readonly ca: DevCa
  readonly server: { readonly certFile: string, readonly keyFile: string }
  readonly caFile: string
  // the registered workstation's client TLS options
  readonly tls: { readonly ca: string, readonly cert: string, readonly key: string }
}

export async function perfPki (sql: Sql, dir: string, workstation: string): Promise<PerfPki> {
  const ca = await createDevCa()
  const server = await writeKeyPair(dir, 'server', await ca.issueServer({ commonName: 'localhost', dnsNames: ['localhost'], ipAddresses: ['127.0.0.1'] }))
  const caFile = join(dir, 'ca.crt')
  await writeFile(caFile, ca.cert)
  const client = await ca.issueClient({ commonName: workstation })
  await machinesRepository(sql).add(machineRecord(workstation, describeCertificate(new X509Certificate(client.cert)), null))
  return { ca, server, caFile, tls: { ca: ca.cert, cert: client.cert, key: client.key } }
}

// Typed by its keys, so a caller reads TOKEN_KEY_ENCRYPTION_KEY and the like back without casts.
export function perfGatewayEnv (pki: PerfPki, databaseUrl: string, upstreamOrigin: string) {
  return {
    NODE_ENV: 'production',
    DATABASE_URL: databaseUrl,
    TLS_CERT_FILE: pki.server.certFile,
    TLS_KEY_FILE: pki.server.keyFile,
    TLS_CLIENT_CA_FILE: pki.caFile,
    EHR_UPSTREAM_URL: `${upstreamOrigin}/fhir`,
    EHR_API_KEY: randomBytes(16).toString('hex'),
    TOKEN_KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
    TOKEN_ISSUER: 'https://localhost',
    TOKEN_TTL_SECONDS: '3600',
    RATE_LIMIT_MAX: '1000000000',
    // production's default level: one access-log line per request
    LOG_LEVEL: 'info'
  }
}

export interface PerfGateway {
  readonly config: GatewayConfig
  readonly tls: PerfPki['tls']
}

export async function perfGateway (sql: Sql, work: string, databaseUrl: string, upstreamPort: number): Promise<PerfGateway> {
  const pki = await perfPki(sql, work, 'ws-perf-01')
  return { config: loadGatewayConfig(perfGatewayEnv(pki, databaseUrl, `http://127.0.0.1:${upstreamPort}`)), tls: pki.tls }
}
