import t from 'tap'
import { AuditTrail, fhirResource, queryParamNames } from '../../gateway/audit.js'
import { createMetrics } from '../../gateway/metrics.js'
import type { AuditRecord } from '../../shared/db/audit.js'

t.test('FHIR resource type and id from the path after the prefix', async t => {
  const cases: Array<[string, string | null, string | null]> = [
    ['/Patient/123', 'Patient', '123'],
    ['/Patient/123/_history/2', 'Patient', '123'],
    ['/Patient', 'Patient', null],
    ['/Patient/', 'Patient', null],
    ['/Patient/_search', 'Patient', null],
    ['/Patient/$match', 'Patient', null],
    ['/Observation/a.b-c', 'Observation', 'a.b-c'],
    ['/metadata', null, null],
    ['/$export', null, null],
    ['/', null, null],
    ['', null, null],
    ['/patient/1', null, null],
    ['/Patient/' + 'x'.repeat(65), 'Patient', null],
    ['/Patient/%3Cscript%3E', 'Patient', null]
  ]
  for (const [path, type, id] of cases) t.same(fhirResource(path), { type, id }, path)
})

t.test('query parameter names, never values', async t => {
  t.same(queryParamNames('name=Jane&birthdate=1970&name=Doe'), ['name', 'birthdate'])
  t.same(queryParamNames('_count&&=x&a=1=2'), ['_count', 'a'])
  t.same(queryParamNames(''), [])
  t.same(queryParamNames('%E2%9C%93=1'), ['%E2%9C%93'], 'as sent, still encoded')
  t.equal(queryParamNames(Array.from({ length: 100 }, (_, i) => `p${i}=v`).join('&')).length, 64, 'bounded count')
  t.equal(queryParamNames('x'.repeat(500) + '=1')[0]?.length, 128, 'bounded length')
})

const row = (requestId: string): AuditRecord => ({
  at: new Date(0), requestId, machineId: null, machineName: null, certThumbprint: null, tokenJti: null,
  clientIp: '127.0.0.1', method: 'GET', route: '/fhir/*', path: '/fhir/Patient', resourceType: 'Patient',
  resourceId: null, queryParams: [], status: 200, errorCode: null, durationMs: 1, upstreamMs: null, bytesIn: 0, bytesOut: 0
})

t.test('a row recorded after close goes to the log rather than nowhere', async t => {
  const logged: unknown[] = []
  const log = { info () {}, warn () {}, error (obj: unknown) { logged.push(obj) } }
  const written: AuditRecord[] = []
  const trail = new AuditTrail(async rows => { written.push(...rows) }, { bufferMax: 10, batchSize: 2, flushIntervalMs: 1000, closeTimeoutMs: 100, log, metrics: createMetrics() })
  trail.start()
  trail.record(row('a'))
  trail.record(row('b')) // a full batch is written at once, without waiting for the timer
  await new Promise(resolve => setImmediate(resolve))
  t.same(written.map(r => r.requestId), ['a', 'b'])
  trail.record(row('c'))
  await trail.close()
  await trail.close()
  t.same(written.map(r => r.requestId), ['a', 'b', 'c'], 'close writes the partial batch')
  trail.record(row('late'))
  t.match(logged, [{ audit: { requestId: 'late' } }])
})

t.test('close with no time left logs the buffered rows', async t => {
  const logged: unknown[] = []
  const log = { info () {}, warn () {}, error (obj: unknown) { logged.push(obj) } }
  const trail = new AuditTrail(async () => { throw new Error('down') }, { bufferMax: 10, batchSize: 5, flushIntervalMs: 1000, closeTimeoutMs: 0, log, metrics: createMetrics() })
  trail.record(row('x'))
  await trail.close()
  t.match(logged, [{ rows: 1 }, { audit: { requestId: 'x' } }])
})
