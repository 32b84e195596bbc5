import postgres from 'postgres'
import t from 'tap'
import type { Test } from 'tap'
import { AuditTrail } from '../../gateway/audit.js'
import { createMetrics } from '../../gateway/metrics.js'
import type { Metrics } from '../../gateway/metrics.js'
import { auditRepository, copyText } from '../../shared/db/audit.js'
import type { AuditEntry, AuditRecord } from '../../shared/db/audit.js'
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
  const trail = new AuditTrail(auditRepository(db.sql), { bufferMax: 100, batchSize: 10, flushIntervalMs: 5, closeTimeoutMs: 5000, log, metrics })
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

// Values the COPY text format and the text[] literal must escape, or must not mistake for
// their own syntax: delimiters, the null marker, quotes, braces, blanks, non-ASCII.
const nasty: ReadonlyArray<Partial<AuditRecord>> = [
  { path: '/fhir/a\tb\nc\rd', queryParams: ['a,b', '{c}', '"d"', 'e\\f', 'NULL', '', ' g ', '\\N'] },
  { path: '\\N', machineName: 'NULL', tokenJti: '', certThumbprint: '\\.', queryParams: [] },
  { path: '/fhir/\\\\server\\share', route: 'x\ty', resourceId: 'é☃😀', queryParams: ['😀', 'ü', '\\"', '\u0001\u001f\u007f'] },
  { machineName: null, tokenJti: null, clientIp: '2001:db8::1', resourceType: null, resourceId: null, errorCode: 'TOKEN_EXPIRED', upstreamMs: null, status: 401 },
  { clientIp: '::ffff:10.0.0.1', durationMs: 0.1 + 0.2, upstreamMs: 1e-7, bytesIn: 2 ** 53 - 1, bytesOut: 0, queryParams: ['a b', ',', '}', '{'] }
]

const comparable = ({ id, requestId, ...rest }: AuditEntry): Omit<AuditEntry, 'id' | 'requestId'> => rest

t.test('COPY and insert store the same values, read back the same through list and export', async t => {
  const db = await createTestDatabase(t)
  const repo = auditRepository(db.sql)
  const at = Date.now() - 60_000
  const batch = (offset: number): AuditRecord[] => nasty.map((n, i) => ({ ...row(uuid(offset + i)), at: new Date(at + i), ...n }))
  t.equal(await repo.copyBatch(batch(100)), nasty.length)
  t.equal(await repo.insertBatch(batch(200)), nasty.length)
  const byCopy = (await repo.list({}, 100)).filter(r => r.requestId.includes('-0000000001'))
  const byInsert = (await repo.list({}, 100)).filter(r => r.requestId.includes('-0000000002'))
  t.equal(byCopy.length, nasty.length)
  t.same(byCopy.map(comparable), byInsert.map(comparable))
  t.match(byCopy.reverse().map(r => ({ path: r.path, queryParams: r.queryParams, machineName: r.machineName, tokenJti: r.tokenJti })), nasty.map(n => ({
    ...(n.path === undefined ? {} : { path: n.path }),
    ...(n.queryParams === undefined ? {} : { queryParams: n.queryParams }),
    ...(n.machineName === undefined ? {} : { machineName: n.machineName }),
    ...(n.tokenJti === undefined ? {} : { tokenJti: n.tokenJti })
  })), 'the values as given: nulls stay null, empty strings empty, the word NULL a word')
  const exported: AuditEntry[] = []
  for await (const r of repo.stream({ since: new Date(at - 1000) })) exported.push(r)
  t.same(exported.filter(r => r.requestId.includes('-0000000001')).map(comparable), byInsert.reverse().map(comparable))
})

t.test('COPY text: escapes, and what it leaves to insertBatch', async t => {
  const text = copyText([{ ...row(uuid(1), null), at: new Date(0), path: 'a\\b\tc\nd\re', queryParams: ['x"y', 'z\\'], upstreamMs: null, durationMs: Number.NaN }])
  t.equal(text, '1970-01-01T00:00:00.000Z\t00000000-0000-4000-8000-000000000001\t\\N\tws-1\t\\N\t\\N\t\\N\tGET\t/fhir/*\t' +
    'a\\\\b\\tc\\nd\\re\tPatient\t1\t{"x\\\\"y","z\\\\\\\\"}\t200\t\\N\t\\N\t\\N\t0\t1\n')
  t.equal(copyText([{ ...row(uuid(1)), path: 'a\u0000b' }]), undefined, 'NUL: no Postgres text holds it')
  t.equal(copyText([{ ...row(uuid(1)), queryParams: ['\ud800'] }]), undefined, 'a lone surrogate has no UTF-8')
  t.equal(copyText([{ ...row(uuid(1)), path: '\ud83d\ude00' }])?.includes('\ud83d\ude00'), true, 'a pair is a character')
  // Left to insertBatch, Postgres refuses the NUL as before (class 22: the trail isolates it).
  const db = await createTestDatabase(t)
  await t.rejects(auditRepository(db.sql).copyBatch([{ ...row(uuid(2)), path: 'a\u0000b' }]), { code: /^22/ })
})

// A batch that committed but whose acknowledgement was lost is retried: by insert, which
// skips what is there; a second COPY would be refused by the unique request id forever.
t.test('a committed batch whose acknowledgement was lost is retried without a duplicate or a refusal', async t => {
  const db = await createTestDatabase(t)
  const repo = auditRepository(db.sql)
  const rows = [row(uuid(1)), row(uuid(2))]
  t.equal(await repo.copyBatch(rows), 2)
  await t.rejects(repo.copyBatch(rows), { code: '23505' }, 'why a retry must not be a COPY')
  t.equal(await repo.insertBatch([...rows, row(uuid(3))]), 1, 'the retry path writes only the new row')

  const log = { info () {}, warn () {}, error () {} }
  const metrics = createMetrics()
  let acknowledgementsLost = 0
  const writer = {
    async copyBatch (batch: readonly AuditRecord[]) {
      await repo.copyBatch(batch)
      acknowledgementsLost++
      throw Object.assign(new Error('connection closed'), { code: 'CONNECTION_CLOSED' })
    },
    insertBatch: repo.insertBatch
  }
  const trail = new AuditTrail(writer, { bufferMax: 100, batchSize: 3, flushIntervalMs: 5, closeTimeoutMs: 5000, log, metrics })
  trail.start()
  for (const n of [4, 5, 6]) trail.record(row(uuid(n)))
  for (let i = 0; i < 400 && trail.depth > 0; i++) await new Promise(resolve => setTimeout(resolve, 5))
  trail.record(row(uuid(7)))
  await trail.close()
  const [counted] = await db.sql<Array<{ n: number, distinct: number }>>`select count(*)::int as n, count(distinct request_id)::int as distinct from audit_log`
  t.same(counted, { n: 7, distinct: 7 })
  t.equal(acknowledgementsLost, 2, 'each new batch starts with a COPY')
  t.equal((await metrics.auditWriteFailures.get()).values[0]?.value, 2)
  t.equal((await metrics.auditRowsWritten.get()).values[0]?.value, 4, 'every row counted once it was acknowledged')
})

// porsager/postgres#1173: a COPY refused or cut after its data was sent must settle, and
// leave its connection usable.
t.test('a COPY Postgres refuses, or whose connection is cut, after its data was sent, fails rather than hangs', async t => {
  const db = await createTestDatabase(t)
  const sql = postgres(db.url, { max: 1, onnotice: () => {}, fetch_types: false })
  t.teardown(async () => { await sql.end({ timeout: 1 }) })
  const repo = auditRepository(sql)
  await t.rejects(repo.copyBatch([row(uuid(1)), row(uuid(2), 'not-an-address')]), { code: '22P02' })
  t.equal(await repo.copyBatch([row(uuid(3))]), 1, 'the connection serves the next COPY')
  t.same((await auditRepository(db.sql).list({}, 10)).map(r => r.requestId), [uuid(3)], 'the refused COPY wrote nothing')

  // An uncommitted row with the same request id holds the COPY on the unique index, after
  // it has received all its data; then its connection is cut.
  const other = postgres(db.url, { max: 1, onnotice: () => {}, fetch_types: false })
  t.teardown(async () => { await other.end({ timeout: 1 }) })
  const [{ pid }] = await sql<Array<{ pid: number }>>`select pg_backend_pid() as pid` as unknown as [{ pid: number }]
  await other.begin(async tx => {
    await auditRepository(tx as unknown as typeof sql).insertBatch([row(uuid(4))])
    const copying = repo.copyBatch([row(uuid(5)), row(uuid(4))])
    copying.catch(() => {})
    for (let i = 0; i < 400; i++) {
      const [waiting] = await db.sql<Array<{ n: number }>>`select count(*)::int as n from pg_stat_activity where pid = ${pid} and wait_event_type = 'Lock'`
      if ((waiting?.n ?? 0) > 0) break
      await new Promise(resolve => setTimeout(resolve, 5))
    }
    await db.sql`select pg_terminate_backend(${pid})`
    await t.rejects(copying, { code: /57P01|CONNECTION_CLOSED|ECONNRESET/ })
  })
  // postgres.js 3.4.9 keeps the FATAL that ended a connection and hands it to the first
  // query of the next one too (its errorResponse outlives the socket), COPY or not; the
  // trail retries that like any failure.
  const next = await repo.copyBatch([row(uuid(6))]).catch(async (err: { code?: string }) => {
    t.equal(err.code, '57P01', 'at most the stale FATAL once')
    return await repo.insertBatch([row(uuid(6))])
  })
  t.equal(next, 1, 'a new connection takes the next write')
  t.same((await auditRepository(db.sql).list({}, 10)).map(r => r.requestId).sort(), [uuid(3), uuid(4), uuid(6)])
})

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
