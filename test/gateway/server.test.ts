import { spawn } from 'node:child_process'
import { createServer } from 'node:net'
import type { AddressInfo } from 'node:net'
import { existsSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import t from 'tap'
import { request } from 'undici'
import { createTestDatabase } from '../helpers/db.js'
import { createPki } from '../helpers/gateway.js'
import { developmentDir } from '../helpers/process.js'
import { startRecordingUpstream } from '../helpers/upstream.js'

// The production process as an operator runs it: built JS, environment only.
const server = new URL('../../dist/gateway/server.js', import.meta.url).pathname
if (!existsSync(server)) t.plan(0, 'dist/ missing: npm test builds before running the suite')

interface Run { code: number | null, stdout: string, stderr: string, lines: Array<Record<string, unknown>> }

function start (env: Record<string, string>, onLine?: (line: Record<string, unknown>, child: ReturnType<typeof spawn>) => void, cwd?: string): Promise<Run> {
  return new Promise(resolve => {
    const child = spawn(process.execPath, [server], { env: { PATH: process.env['PATH'] ?? '', ...env }, cwd: cwd ?? t.testdir({}) })
    const run: Run = { code: null, stdout: '', stderr: '', lines: [] }
    child.stdout.on('data', (chunk: Buffer) => {
      run.stdout += String(chunk)
      const lines = run.stdout.split('\n')
      run.stdout = lines.pop() ?? ''
      for (const l of lines) {
        try {
          const parsed = JSON.parse(l) as Record<string, unknown>
          run.lines.push(parsed)
          onLine?.(parsed, child)
        } catch {}
      }
    })
    child.stderr.on('data', (chunk: Buffer) => { run.stderr += String(chunk) })
    const kill = setTimeout(() => { child.kill('SIGKILL') }, 30_000)
    child.on('close', code => { clearTimeout(kill); run.code = code; resolve(run) })
  })
}

t.test('a missing or malformed environment stops the start with one message', async t => {
  const run = await start({ NODE_ENV: 'production', GATEWAY_PORT: 'x', EHR_API_KEY: 'never-print-me' })
  t.equal(run.code, 1)
  for (const v of ['DATABASE_URL', 'TLS_CERT_FILE', 'TLS_KEY_FILE', 'TLS_CLIENT_CA_FILE', 'EHR_UPSTREAM_URL', 'TOKEN_KEY_ENCRYPTION_KEY', 'GATEWAY_PORT']) {
    t.match(run.stderr, v)
  }
  t.notMatch(run.stderr, 'never-print-me')
  t.notMatch(run.stderr, /\n\s+at /, 'no stack trace')
})

t.test('refuses an unmigrated database, then starts, serves and drains on SIGTERM', async t => {
  const db = await createTestDatabase(t, { migrate: false })
  const pki = await createPki(t)
  const upstream = await startRecordingUpstream()
  t.teardown(() => upstream.close())
  const env = {
    NODE_ENV: 'production',
    DATABASE_URL: db.url,
    TLS_CERT_FILE: pki.certFile,
    TLS_KEY_FILE: pki.keyFile,
    TLS_CLIENT_CA_FILE: pki.caFile,
    EHR_UPSTREAM_URL: upstream.url,
    TOKEN_KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
    GATEWAY_HOST: '127.0.0.1',
    GATEWAY_PORT: '0',
    OPS_PORT: '0'
  }
  const refused = await start(env)
  t.equal(refused.code, 1)
  t.match(refused.stderr, /DB_NOT_MIGRATED.*ehrctl db migrate/)

  const { migrate } = await import('../../shared/db/migrations.js')
  await migrate(db.sql)

  // Review finding: a start that failed half-way kept running, listening, with no signal
  // handlers. Now it closes what it opened and exits.
  const busy = createServer()
  await new Promise<void>(resolve => { busy.listen(0, '127.0.0.1', resolve) })
  t.teardown(() => { busy.close() })
  const busyPort = String((busy.address() as AddressInfo).port)
  const halfway = await start({ ...env, OPS_HOST: '127.0.0.1', OPS_PORT: busyPort })
  t.equal(halfway.code, 1, 'exits when the ops port is taken')
  t.match(halfway.stderr, /EADDRINUSE/)
  let healthz = 0
  const run = await start(env, (line, child) => {
    if (line['msg'] !== 'ehr-gateway ready') return
    void (async () => {
      const res = await request(`${String(line['ops'])}/healthz`)
      healthz = res.statusCode
      await res.body.dump()
      child.kill('SIGTERM')
    })()
  })
  t.equal(healthz, 200)
  t.equal(run.code, 0, run.stderr)
  t.ok(run.lines.some(l => l['msg'] === 'shutting down: draining in-flight requests'))
})

// npm start assumes production, but a .env saying development wins over that assumption:
// the development fallbacks (embedded Postgres in ./.data) then apply, and stop cleanly.
t.test('NODE_ENV=development in .env selects the embedded Postgres', async t => {
  const pki = await createPki(t)
  const dir = developmentDir(t, pki)
  const run = await start({}, undefined, dir)
  t.equal(run.code, 1)
  t.match(run.stderr, /DB_NOT_MIGRATED.*ehrctl db migrate/, 'reached the embedded database, unmigrated')
  t.ok(existsSync(`${dir}/.data/postgres/PG_VERSION`), 'initialised in ./.data')
  t.notOk(existsSync(`${dir}/.data/postgres.owner`), 'and stopped it again')
})
