import { existsSync } from 'node:fs'
import t from 'tap'
import { Agent, request } from 'undici'
import { auditRepository } from '../../shared/db/audit.js'
import { SERVER, serverSetup, spawnServer } from '../helpers/process.js'

// The production process: rows still in the buffer when SIGTERM arrives are written before
// the database closes and the process exits.
if (!existsSync(SERVER)) t.plan(0, 'dist/ missing: npm test builds before running the suite')

t.test('SIGTERM writes the buffered audit rows before exit', async t => {
  const setup = await serverSetup(t)
  const server = spawnServer(t, {
    ...setup.env,
    // Nothing is written before the signal: one batch a minute, 1000 rows a batch.
    AUDIT_FLUSH_INTERVAL_MS: '60000',
    AUDIT_BATCH_SIZE: '1000'
  })
  const ready = await server.line(l => l['msg'] === 'ehr-gateway ready', 'the gateway to be ready')
  const url = String(ready['gateway']).replace('127.0.0.1', 'localhost')
  const agent = new Agent({ connect: { ca: setup.pki.ca.cert, cert: setup.machine.cert, key: setup.machine.key } })
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
  t.equal((await auditRepository(setup.db.sql).list({}, 100)).length, 0, 'still buffered')
  server.child.kill('SIGTERM')
  t.equal(await server.exited, 0, server.stderr)
  const rows = await auditRepository(setup.db.sql).list({}, 100)
  t.same(new Set(rows.map(r => r.requestId)), new Set(ids), 'every answered request has its row')
})
