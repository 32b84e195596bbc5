import { spawn } from 'node:child_process'
import { X509Certificate, randomBytes } from 'node:crypto'
import { existsSync } from 'node:fs'
import t from 'tap'
import { Agent, request } from 'undici'
import { describeCertificate } from '../../shared/certificates.js'
import { auditRepository } from '../../shared/db/audit.js'
import { machineRecord, machinesRepository } from '../../shared/db/machines.js'
import { createTestDatabase } from '../helpers/db.js'
import { createPki } from '../helpers/gateway.js'
import { startRecordingUpstream } from '../helpers/upstream.js'

// The production process: rows still in the buffer when SIGTERM arrives are written before
// the database closes and the process exits.
const server = new URL('../../dist/gateway/server.js', import.meta.url).pathname
if (!existsSync(server)) t.plan(0, 'dist/ missing: npm test builds before running the suite')

t.test('SIGTERM writes the buffered audit rows before exit', async t => {
  const db = await createTestDatabase(t)
  const pki = await createPki(t)
  const upstream = await startRecordingUpstream()
  t.teardown(() => upstream.close())
  const pair = await pki.ca.issueClient({ commonName: 'ws-term' })
  await machinesRepository(db.sql).add(machineRecord('ws-term', describeCertificate(new X509Certificate(pair.cert)), null))
  const child = spawn(process.execPath, [server], {
    cwd: t.testdir({}),
    env: {
      PATH: process.env['PATH'] ?? '',
      NODE_ENV: 'production',
      DATABASE_URL: db.url,
      TLS_CERT_FILE: pki.certFile,
      TLS_KEY_FILE: pki.keyFile,
      TLS_CLIENT_CA_FILE: pki.caFile,
      EHR_UPSTREAM_URL: upstream.url,
      TOKEN_KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
      TOKEN_ISSUER: 'https://gateway.test',
      GATEWAY_HOST: '127.0.0.1',
      GATEWAY_PORT: '0',
      OPS_PORT: '0',
      // Nothing is written before the signal: one batch a minute, 1000 rows a batch.
      AUDIT_FLUSH_INTERVAL_MS: '60000',
      AUDIT_BATCH_SIZE: '1000'
    }
  })
  const kill = setTimeout(() => { child.kill('SIGKILL') }, 30_000)
  let out = ''
  const ready = new Promise<string>((resolve, reject) => {
    child.stdout.on('data', (chunk: Buffer) => {
      out += String(chunk)
      const m = /"gateway":"(https:\/\/[^"]+)".*"msg":"ehr-gateway ready"/.exec(out)
      if (m !== null) resolve((m[1] as string).replace('127.0.0.1', 'localhost'))
    })
    child.on('close', code => { reject(new Error(`exited ${String(code)}: ${out}`)) })
  })
  const exited = new Promise<number | null>(resolve => { child.on('close', code => { clearTimeout(kill); resolve(code) }) })
  const url = await ready
  const agent = new Agent({ connect: { ca: pki.ca.cert, cert: pair.cert, key: pair.key } })
  t.teardown(async () => { await agent.close() })
  const tokenRes = await request(`${url}/v1/token`, { method: 'POST', dispatcher: agent })
  t.equal(tokenRes.statusCode, 200)
  const { access_token: token } = await tokenRes.body.json() as { access_token: string }
  const ids: string[] = [String(tokenRes.headers['x-request-id'])]
  for (let i = 0; i < 4; i++) {
    const res = await request(`${url}/fhir/Patient/${i}`, { dispatcher: agent, headers: { authorization: `Bearer ${token}` } })
    await res.body.dump()
    t.equal(res.statusCode, 200)
    ids.push(String(res.headers['x-request-id']))
  }
  t.equal((await auditRepository(db.sql).list({}, 100)).length, 0, 'still buffered')
  child.kill('SIGTERM')
  t.equal(await exited, 0, out)
  const rows = await auditRepository(db.sql).list({}, 100)
  t.same(new Set(rows.map(r => r.requestId)), new Set(ids), 'every answered request has its row')
})
