import { randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import type { FastifyInstance } from 'fastify'
import type { Test } from 'tap'
import { Agent, request } from 'undici'
import type { Dispatcher } from 'undici'
import { buildGateway } from '../../gateway/app.js'
import { createDevCa, writeKeyPair } from '../../gateway/demo/pki.js'
import type { DevCa, KeyPair } from '../../gateway/demo/pki.js'
import { createUpstreamPool } from '../../gateway/upstream.js'
import { describeCertificate } from '../../shared/certificates.js'
import { loadGatewayConfig } from '../../shared/config.js'
import type { Env, GatewayConfig } from '../../shared/config.js'
import { machineRecord, machinesRepository } from '../../shared/db/machines.js'
import type { Machine } from '../../shared/db/machines.js'
import { X509Certificate } from 'node:crypto'
import { createTestDatabase } from './db.js'
import type { TestDatabase } from './db.js'
import { startRecordingUpstream } from './upstream.js'
import type { RecordingUpstream } from './upstream.js'

// A settable clock: tests move time instead of waiting for it (STYLE §5).
export class TestClock {
  now = Date.now()
  readonly read = (): number => this.now
  advance (ms: number): void { this.now += ms }
}

export interface Pki {
  readonly ca: DevCa
  readonly dir: string
  readonly caFile: string
  readonly certFile: string
  readonly keyFile: string
}

// A directory of its own per PKI: t.testdir() is one fixed path per test, and a test that
// starts two gateways would have the second overwrite the first one's CA.
export async function createPki (t: Test): Promise<Pki> {
  const dir = await mkdtemp(join(tmpdir(), 'ehrgw-pki-'))
  t.teardown(async () => { await rm(dir, { recursive: true, force: true }) })
  const ca = await createDevCa()
  const server = await ca.issueServer({ commonName: 'localhost' })
  const files = await writeKeyPair(dir, 'server', server)
  const caFile = (await writeKeyPair(dir, 'ca', { cert: ca.cert, key: ca.key })).certFile
  return { ca, dir, caFile, ...files }
}

export interface TestGateway {
  readonly app: FastifyInstance
  readonly url: string
  readonly config: GatewayConfig
  readonly db: TestDatabase
  readonly pki: Pki
  readonly upstream: RecordingUpstream
  readonly clock: TestClock
  readonly logs: string[]
  register(name: string, pair?: KeyPair): Promise<{ machine: Machine, pair: KeyPair }>
  agent(pair?: KeyPair): Agent
  fetchToken(agent: Agent): Promise<string>
  call(agent: Agent, path: string, options?: { method?: Dispatcher.HttpMethod, headers?: Record<string, string>, body?: string | Buffer }): Promise<{ status: number, headers: Record<string, string | string[] | undefined>, text: string, json: () => Record<string, unknown> }>
}

export const TEST_API_KEY = 'test-api-key-' + randomBytes(12).toString('hex')

export interface GatewayOptions {
  readonly env?: Env
  readonly db?: TestDatabase
  readonly pki?: Pki
  readonly upstream?: RecordingUpstream
  readonly clock?: TestClock
  // A fixed port instead of 0, for configuration that must name the URL (GATEWAY_PUBLIC_URL).
  readonly port?: number
}

// A real gateway on 127.0.0.1:0 with real TLS, a real database and a real upstream.
export async function startGateway (t: Test, options: GatewayOptions = {}): Promise<TestGateway> {
  const db = options.db ?? await createTestDatabase(t)
  const pki = options.pki ?? await createPki(t)
  const upstream = options.upstream ?? await startRecordingUpstream()
  if (options.upstream === undefined) t.teardown(async () => { await upstream.close() })
  const clock = options.clock ?? new TestClock()
  const config = loadGatewayConfig({
    NODE_ENV: 'test',
    DATABASE_URL: db.url,
    TLS_CERT_FILE: pki.certFile,
    TLS_KEY_FILE: pki.keyFile,
    TLS_CLIENT_CA_FILE: pki.caFile,
    EHR_UPSTREAM_URL: upstream.url,
    EHR_API_KEY: TEST_API_KEY,
    TOKEN_ISSUER: 'https://gateway.test',
    TOKEN_KEY_ENCRYPTION_KEY: randomBytesKey(db.url),
    LOG_LEVEL: 'info',
    ...options.env
  })
  const logs: string[] = []
  const logStream = new Writable({ write (chunk, _enc, done) { logs.push(String(chunk)); done() } })
  const pool = createUpstreamPool(config)
  const app = await buildGateway(config, { sql: db.sql, upstream: pool, clock: clock.read, logStream })
  await app.listen({ host: '127.0.0.1', port: options.port ?? 0 })
  const address = app.server.address()
  const port = typeof address === 'object' && address !== null ? address.port : 0
  const agents: Agent[] = []
  t.teardown(async () => {
    await Promise.all(agents.map(async a => { await a.close() }))
    await app.close()
    await pool.close()
  })
  const url = `https://localhost:${port}`
  const machines = machinesRepository(db.sql)

  const gateway: TestGateway = {
    app, url, config, db, pki, upstream, clock, logs,
    async register (name, pair) {
      const keyPair = pair ?? await pki.ca.issueClient({ commonName: name })
      const machine = await machines.add(machineRecord(name, describeCertificate(new X509Certificate(keyPair.cert)), null))
      return { machine, pair: keyPair }
    },
    agent (pair) {
      const agent = new Agent({ connect: { ca: pki.ca.cert, ...(pair === undefined ? {} : { cert: pair.cert, key: pair.key }) } })
      agents.push(agent)
      return agent
    },
    async fetchToken (agent) {
      const res = await gateway.call(agent, '/v1/token', { method: 'POST' })
      if (res.status !== 200) throw new Error(`token request failed: ${res.status} ${res.text}`)
      return res.json()['access_token'] as string
    },
    async call (agent, path, opts = {}) {
      const res = await request(url + path, {
        dispatcher: agent,
        method: opts.method ?? 'GET',
        headers: opts.headers ?? {},
        body: opts.body ?? null
      })
      const text = await res.body.text()
      return { status: res.statusCode, headers: res.headers, text, json: () => JSON.parse(text) as Record<string, unknown> }
    }
  }
  return gateway
}

// One key-encryption key per database, so two gateways on one database agree on it.
const keks = new Map<string, string>()
function randomBytesKey (dbUrl: string): string {
  let kek = keks.get(dbUrl)
  if (kek === undefined) {
    kek = randomBytes(32).toString('base64')
    keks.set(dbUrl, kek)
  }
  return kek
}
