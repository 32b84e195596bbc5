import { spawn } from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import type { Test } from 'tap'
import { Agent, request } from 'undici'
import type { KeyPair } from '../../gateway/demo/pki.js'
import { describeCertificate } from '../../shared/certificates.js'
import { machineRecord, machinesRepository } from '../../shared/db/machines.js'
import { X509Certificate } from 'node:crypto'
import { createTestDatabase } from './db.js'
import type { TestDatabase } from './db.js'
import { createPki } from './gateway.js'
import type { Pki } from './gateway.js'
import { startRecordingUpstream } from './upstream.js'
import type { RecordingUpstream } from './upstream.js'

// The production process as an operator runs it: `node dist/gateway/server.js`, environment only.
export const SERVER = new URL('../../dist/gateway/server.js', import.meta.url).pathname

export type LogLine = Record<string, unknown>

export interface ServerProcess {
  readonly child: ChildProcess
  readonly lines: LogLine[]
  stderr: string
  readonly exited: Promise<number | null>
  // Resolves with the first log line (from now on, or already seen) that matches.
  line(match: (line: LogLine) => boolean, what: string, timeoutMs?: number): Promise<LogLine>
}

export function spawnServer (t: Test, env: Record<string, string>, cwd?: string): ServerProcess {
  const child = spawn(process.execPath, [SERVER], { env: { PATH: process.env['PATH'] ?? '', ...env }, cwd: cwd ?? t.testdir({}) })
  const lines: LogLine[] = []
  const waiters: Array<{ match: (line: LogLine) => boolean, resolve: (line: LogLine) => void }> = []
  let partial = ''
  child.stdout?.on('data', (chunk: Buffer) => {
    partial += String(chunk)
    const complete = partial.split('\n')
    partial = complete.pop() ?? ''
    for (const text of complete) {
      let parsed: LogLine
      try { parsed = JSON.parse(text) as LogLine } catch { continue }
      lines.push(parsed)
      for (const w of [...waiters]) {
        if (w.match(parsed)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(parsed) }
      }
    }
  })
  const proc: ServerProcess = {
    child,
    lines,
    stderr: '',
    exited: new Promise(resolve => { child.on('close', code => { resolve(code) }) }),
    line: async (match, what, timeoutMs = 20_000) => {
      const seen = lines.find(match)
      if (seen !== undefined) return seen
      return await new Promise((resolve, reject) => {
        const timer = setTimeout(() => { reject(new Error(`timed out waiting for ${what}; stderr: ${proc.stderr}`)) }, timeoutMs)
        waiters.push({ match, resolve: l => { clearTimeout(timer); resolve(l) } })
      })
    }
  }
  child.stderr?.on('data', (chunk: Buffer) => { proc.stderr += String(chunk) })
  // Whatever a test does, no server outlives it.
  const kill = setTimeout(() => { child.kill('SIGKILL') }, 110_000)
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    await proc.exited
    clearTimeout(kill)
  })
  return proc
}

export interface ServerSetup {
  readonly db: TestDatabase
  readonly pki: Pki
  readonly upstream: RecordingUpstream
  readonly env: Record<string, string>
  readonly machine: KeyPair
}

// A migrated database with one registered machine, a PKI, an upstream, and the production
// environment that points a gateway process at them on ephemeral ports.
export async function serverSetup (t: Test, pki?: Pki): Promise<ServerSetup> {
  const db = await createTestDatabase(t)
  const certs = pki ?? await createPki(t)
  const upstream = await startRecordingUpstream()
  t.teardown(() => upstream.close())
  const machine = await certs.ca.issueClient({ commonName: 'ws-process' })
  await machinesRepository(db.sql).add(machineRecord('ws-process', describeCertificate(new X509Certificate(machine.cert)), null))
  const env = {
    NODE_ENV: 'production',
    DATABASE_URL: db.url,
    TLS_CERT_FILE: certs.certFile,
    TLS_KEY_FILE: certs.keyFile,
    TLS_CLIENT_CA_FILE: certs.caFile,
    EHR_UPSTREAM_URL: upstream.url,
    TOKEN_KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
    TOKEN_ISSUER: 'https://gateway.test',
    GATEWAY_HOST: '127.0.0.1',
    GATEWAY_PORT: '0',
    OPS_HOST: '127.0.0.1',
    OPS_PORT: '0',
    RATE_LIMIT_MAX: '100000',
    SHUTDOWN_GRACE_MS: '5000'
  }
  return { db, pki: certs, upstream, env, machine }
}

// One request on a connection of its own (so the primary hands each to the next worker).
export async function once (url: string, setup: ServerSetup, path: string, options: { method?: 'GET' | 'POST', headers?: Record<string, string> } = {}): Promise<{ status: number, text: string }> {
  const agent = new Agent({ connect: { ca: setup.pki.ca.cert, cert: setup.machine.cert, key: setup.machine.key } })
  try {
    const res = await request(url + path, { dispatcher: agent, method: options.method ?? 'GET', headers: options.headers ?? {} })
    return { status: res.statusCode, text: await res.body.text() }
  } finally {
    await agent.close()
  }
}

// A working directory whose .env says development, as a developer's checkout would: no
// DATABASE_URL, so the gateway falls back to the embedded Postgres in ./.data.
export function developmentDir (t: Test, pki: Pki, extra: readonly string[] = []): string {
  return t.testdir({
    '.env': [
      'NODE_ENV=development',
      `TLS_CERT_FILE=${pki.certFile}`,
      `TLS_KEY_FILE=${pki.keyFile}`,
      `TLS_CLIENT_CA_FILE=${pki.caFile}`,
      'EHR_UPSTREAM_URL=http://127.0.0.1:1/fhir',
      'GATEWAY_PORT=0',
      'OPS_PORT=0',
      ...extra
    ].join('\n')
  })
}
