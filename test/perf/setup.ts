// The gateway both perf scripts measure: a dev CA, the server's key pair and one registered
// workstation under `work`, and the config that points a gateway at them, the scratch
// database and the stand-in upstream.
import { X509Certificate, randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { Sql } from 'postgres'
import { createDevCa, writeKeyPair } from '../../gateway/demo/pki.js'
import { describeCertificate } from '../../shared/certificates.js'
import { loadGatewayConfig } from '../../shared/config.js'
import type { GatewayConfig } from '../../shared/config.js'
import { machineRecord, machinesRepository } from '../../shared/db/machines.js'

export interface PerfGateway {
  readonly config: GatewayConfig
  // the workstation's client TLS options
  readonly tls: { readonly ca: string, readonly cert: string, readonly key: string }
}

export async function perfGateway (sql: Sql, work: string, databaseUrl: string, upstreamPort: number): Promise<PerfGateway> {
  const ca = await createDevCa()
  const server = await writeKeyPair(work, 'server', await ca.issueServer({ commonName: 'localhost' }))
  const caFile = join(work, 'ca.crt')
  await writeFile(caFile, ca.cert)
  const client = await ca.issueClient({ commonName: 'ws-perf-01' })
  await machinesRepository(sql).add(machineRecord('ws-perf-01', describeCertificate(new X509Certificate(client.cert)), null))
  const config = loadGatewayConfig({
    NODE_ENV: 'production',
    DATABASE_URL: databaseUrl,
    TLS_CERT_FILE: server.certFile,
    TLS_KEY_FILE: server.keyFile,
    TLS_CLIENT_CA_FILE: caFile,
    EHR_UPSTREAM_URL: `http://127.0.0.1:${upstreamPort}/fhir`,
    EHR_API_KEY: randomBytes(16).toString('hex'),
    TOKEN_KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
    TOKEN_ISSUER: 'https://localhost',
    TOKEN_TTL_SECONDS: '3600',
    RATE_LIMIT_MAX: '100000000',
    LOG_LEVEL: 'info'
  })
  return { config, tls: { ca: ca.cert, cert: client.cert, key: client.key } }
}
