import t from 'tap'
import { AuditTrail } from '../../gateway/audit.js'
import { createMetrics } from '../../gateway/metrics.js'
import { auditRepository } from '../../shared/db/audit.js'
import type { AuditRecord } from '../../shared/db/audit.js'
import { createTestDatabase } from '../helpers/db.js'

const row = (requestId: string, clientIp: string | null = '192.0.2.1'): AuditRecord => ({
  at: new Date(), requestId, machineId: null, machineName: 'ws-1', certThumbprint: null, tokenJti: null,
  clientIp, method: 'GET', route: '/fhir/*', path: '/fhir/Patient/1', resourceType: 'Patient',
  resourceId: '1', queryParams: ['a'], status: 200, errorCode: null, durationMs: 1, upstreamMs: 1, bytesIn: 0, bytesOut: 1
})

// One value Postgres refuses must not hold its whole batch (and then, the buffer full, all
// traffic) hostage: that row goes to the error log, the others to the table.
t.test('a row Postgres refuses is isolated and logged; its batch-mates are written', async t => {
  const db = await createTestDatabase(t)
  const logged: Array<Record<string, unknown>> = []
  const log = { info () {}, warn () {}, error (obj: Record<string, unknown>) { logged.push(obj) } }
  const metrics = createMetrics()
  const trail = new AuditTrail(auditRepository(db.sql).insertBatch, { bufferMax: 100, batchSize: 10, flushIntervalMs: 5, closeTimeoutMs: 5000, log, metrics })
  trail.start()
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
