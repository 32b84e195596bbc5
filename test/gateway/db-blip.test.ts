import postgres from 'postgres'
import t from 'tap'
import { machinesRepository } from '../../shared/db/machines.js'
import { assertProblem } from '../helpers/assert.js'
import { startGateway } from '../helpers/gateway.js'

// Every connection of the gateway is killed, as a Postgres restart or failover would: the
// gateway must come back by itself, and revocations must still arrive at once, which needs
// the LISTEN connection re-established (and the cache dropped for what it may have missed).
t.test('after its database connections are cut, the gateway recovers and still hears revocations', async t => {
  const gw = await startGateway(t)
  const { pair } = await gw.register('ws-blip')
  const agent = gw.agent(pair)
  const token = await gw.fetchToken(agent)
  const auth = { authorization: `Bearer ${token}` }
  t.equal((await gw.call(agent, '/fhir/Patient/1', { headers: auth })).status, 200)

  const dbName = new URL(gw.db.url).pathname.slice(1)
  const killer = postgres(process.env['DATABASE_URL'] ?? '', { max: 1, onnotice: () => {} })
  t.teardown(async () => { await killer.end({ timeout: 1 }) })
  const killed = await killer`select pg_terminate_backend(pid) from pg_stat_activity where datname = ${dbName} and pid <> pg_backend_pid()`
  t.ok(killed.length >= 2, `cut ${killed.length} connections (pool and LISTEN)`)

  // The registry entry is cached, so traffic continues; give LISTEN a moment to come back.
  let status = 0
  for (let i = 0; i < 100 && status !== 200; i++) {
    status = (await gw.call(agent, '/fhir/Patient/1', { headers: auth })).status
    if (status !== 200) await new Promise(resolve => setTimeout(resolve, 50))
  }
  t.equal(status, 200, 'serving again')
  // Wait until the LISTEN connection is back before revoking.
  for (let i = 0; i < 100; i++) {
    const [row] = await killer<Array<{ n: number }>>`select count(*)::int as n from pg_stat_activity where datname = ${dbName} and query ilike 'listen%'`
    if ((row?.n ?? 0) >= 1) break
    await new Promise(resolve => setTimeout(resolve, 50))
  }

  await machinesRepository(gw.db.sql).revoke('ws-blip', 'after the blip')
  const started = Date.now()
  let res = await gw.call(agent, '/fhir/Patient/1', { headers: auth })
  while (res.status === 200 && Date.now() - started < 2000) {
    await new Promise(resolve => setTimeout(resolve, 20))
    res = await gw.call(agent, '/fhir/Patient/1', { headers: auth })
  }
  assertProblem(t, res, 403, 'MACHINE_REVOKED')
  t.ok(Date.now() - started < 1000, `revocation seen in ${Date.now() - started} ms`)
})
