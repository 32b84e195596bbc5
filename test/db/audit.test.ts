import t from 'tap'
import type { Test } from 'tap'
import { AuditTrail } from '../../gateway/audit.js'
import { createMetrics } from '../../gateway/metrics.js'
import type { Metrics } from '../../gateway/metrics.js'
import { auditRepository } from '../../shared/db/audit.js'
import type { AuditRecord } from '../../shared/db/audit.js'
import { createTestDatabase } from '../helpers/db.js'
import type { TestDatabase } from '../helpers/db.js'

const row = (requestId: string, clientIp: string | null = '192.0.2.1'): AuditRecord => ({
  at: new Date(), requestId, machineId: null, machineName: 'ws-1', certThumbprint: null, tokenJti: null,
  clientIp, method: 'GET', route: '/fhir/*', path: '/fhir/Patient/1', resourceType: 'Patient',
  resourceId: '1', queryParams: ['a'], status: 200, errorCode: null, durationMs: 1, upstreamMs: 1, bytesIn: 0, bytesOut: 1
})

// A started trail on a fresh database whose error log the test reads.
async function loggingTrail (t: Test): Promise<{ db: TestDatabase, logged: Array<Record<string, unknown>>, trail: AuditTrail, metrics: Metrics }> {
  const db = await createTestDatabase(t)
  const logged: Array<Record<string, unknown>> = []
  const log = { info () {}, warn () {}, error (obj: Record<string, unknown>) { logged.push(obj) } }
  const metrics = createMetrics()
  const trail = new AuditTrail(auditRepository(db.sql).insertBatch, { bufferMax: 100, batchSize: 10, flushIntervalMs: 5, closeTimeoutMs: 5000, log, metrics })
  trail.start()
  return { db, logged, trail, metrics }
}

// One value Postgres refuses must not hold its whole batch (and then, the buffer full, all
// traffic) hostage: that row goes to the error log, the others to the table.
t.test('a row Postgres refuses is isolated and logged; its batch-mates are written', async t => {
  const { db, logged, trail, metrics } = await loggingTrail(t)
  const ids = ['00000000-0000-4000-8000-000000000001', '00000000-0000-4000-8000-000000000002', '00000000-0000-4000-8000-000000000003', '00000000-0000-4000-8000-000000000004']
  trail.record(row(ids[0] as string))
  trail.record(row(ids[1] as string, 'not-an-address'))
  trail.record(row(ids[2] as string, null))
  for (let i = 0; i < 200 && trail.depth > 0; i++) await new Promise(resolve => setTimeout(resolve, 5))
  trail.record(row(ids[3] as string))
  await trail.close()
  const stored = await auditRepository(db.sql).list({}, 10)
  t.same(new Set(stored.map(r => r.requestId)), new Set([ids[0], ids[2], ids[3]]))
  t.equal(stored.find(r => r.requestId === ids[2])?.clientIp, null, 'an unknown address is stored as null')
  t.match(logged.filter(l => 'audit' in l), [{ audit: { requestId: ids[1] } }])
  t.equal((await metrics.auditRowsUnwritten.get()).values[0]?.value, 1)
})

const uuid = (n: number): string => `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`

// list() looks for the newest rows in growing windows back from now (no btree on at since
// migration 4): whichever window answers, the answer is the newest rows overall.
t.test('list returns the newest rows whichever window holds them', async t => {
  const db = await createTestDatabase(t)
  const repo = auditRepository(db.sql)
  const HOUR = 3_600_000
  const ages = [-HOUR, 0.5 * HOUR, 2 * HOUR, 30 * HOUR, 10 * 24 * HOUR, 40 * 24 * HOUR, 400 * 24 * HOUR, 800 * 24 * HOUR]
  const now = Date.now()
  await repo.insertBatch(ages.map((age, i) => ({ ...row(uuid(i)), at: new Date(now - age), machineName: i % 2 === 0 ? 'ws-even' : 'ws-odd', status: i === 6 ? 500 : 200 })))
  for (let limit = 1; limit <= ages.length + 1; limit++) {
    t.same((await repo.list({}, limit)).map(r => r.requestId), ages.slice(0, limit).map((_, i) => uuid(i)), `limit ${limit}`)
  }
  t.same((await repo.list({ machine: 'ws-odd' }, 3)).map(r => r.requestId), [uuid(1), uuid(3), uuid(5)])
  t.same((await repo.list({ status: 500 }, 5)).map(r => r.requestId), [uuid(6)], 'a filter older than every window')
  t.same((await repo.list({ since: new Date(now - 3 * HOUR) }, 10)).map(r => r.requestId), [uuid(0), uuid(1), uuid(2)])
  t.same((await repo.list({ since: new Date(now - 500 * 24 * HOUR) }, 10)).length, 7)
})

// Each column travels as an array literal: a value that looks like array syntax, quoting,
// escaping or NULL is still just that value when read back.
t.test('values that look like array-literal syntax are stored as sent', async t => {
  const db = await createTestDatabase(t)
  const repo = auditRepository(db.sql)
  const hostile = ['NULL', '', '"', '\\', '\\"', '{a,b}', 'a,b', ' padded ', '}{', 'ünïcødé 🩺', "it's", '\t\n', '\\N']
  const rows: AuditRecord[] = hostile.map((text, i) => ({
    ...row(uuid(100 + i)),
    machineName: text,
    path: `/fhir/Patient/${text}`,
    resourceId: text,
    queryParams: [text, `${text}2`, 'NULL'],
    errorCode: i % 2 === 0 ? null : text
  }))
  rows.push({ ...row(uuid(99)), queryParams: [], resourceId: null, resourceType: null, upstreamMs: null, machineName: null })
  t.equal(await repo.insertBatch(rows), rows.length)
  const stored = new Map((await repo.list({}, 100)).map(r => [r.requestId, r]))
  for (const sent of rows) {
    t.match(stored.get(sent.requestId), {
      machineName: sent.machineName, path: sent.path, resourceId: sent.resourceId, resourceType: sent.resourceType,
      errorCode: sent.errorCode, upstreamMs: sent.upstreamMs
    }, JSON.stringify(sent.machineName))
    t.same(stored.get(sent.requestId)?.queryParams, sent.queryParams, `query params of ${JSON.stringify(sent.machineName)}`)
  }
})
