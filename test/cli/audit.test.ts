import { randomUUID } from 'node:crypto'
import t from 'tap'
import { csvCell } from '../../cli/audit/export.js'
import { auditRepository } from '../../shared/db/audit.js'
import type { AuditRecord } from '../../shared/db/audit.js'
import { createTestDatabase } from '../helpers/db.js'
import { ehrctl, parseJson } from './harness.js'
import type { JsonError } from './harness.js'

const cwd = t.testdir()
const db = await createTestDatabase(t)
const env = { DATABASE_URL: db.url }
const HOUR = 3_600_000
const now = Date.now()

function row (overrides: Partial<AuditRecord>): AuditRecord {
  return {
    at: new Date(now),
    requestId: randomUUID(),
    machineId: null,
    machineName: 'ws-1',
    certThumbprint: 'A'.repeat(43),
    tokenJti: 'jti-1',
    clientIp: '10.0.0.7',
    method: 'GET',
    route: '/fhir/*',
    path: '/fhir/Patient/1',
    resourceType: 'Patient',
    resourceId: '1',
    queryParams: [],
    status: 200,
    errorCode: null,
    durationMs: 3.5,
    upstreamMs: 2.25,
    bytesIn: 0,
    bytesOut: 700,
    ...overrides
  }
}

const repo = auditRepository(db.sql)
await repo.insertBatch([
  row({ at: new Date(now - 3 * HOUR), path: '/fhir/Patient/old' }),
  row({ at: new Date(now - 30 * 60_000), machineName: 'ws-2', status: 401, errorCode: 'TOKEN_EXPIRED', tokenJti: null }),
  row({ at: new Date(now - 10 * 60_000), path: '/fhir/Patient', resourceId: null, queryParams: ['name', 'birthdate'] }),
  // A path and a parameter name a spreadsheet would misread.
  row({ at: new Date(now - 60_000), path: '/fhir/Binary/a,"b"', queryParams: ['=HYPERLINK(1)'], machineName: null, status: 403, errorCode: 'MACHINE_NOT_REGISTERED' }),
  row({ at: new Date(now - 8 * 365 * 24 * HOUR), path: '/fhir/Patient/ancient' })
])

interface EntryJson { id: string, at: string, requestId: string, machineName: string | null, status: number, errorCode: string | null, path: string, queryParams: string[], bytesOut: number, upstreamMs: number | null }

t.test('audit list: newest first, with filters, as a table or JSON', async t => {
  const all = await ehrctl(['audit', 'list', '--json'], { env, cwd })
  t.equal(all.code, 0, all.stdout)
  const rows = parseJson<EntryJson[]>(all)
  t.equal(rows.length, 5)
  t.same(rows.map(r => r.path).slice(0, 2), ['/fhir/Binary/a,"b"', '/fhir/Patient'], 'newest first')
  t.match(rows[1], { queryParams: ['name', 'birthdate'], status: 200, bytesOut: 700, upstreamMs: 2.25, machineName: 'ws-1' })
  t.match(rows[0]?.at, /^\d{4}-\d\d-\d\dT/)

  const recent = parseJson<EntryJson[]>(await ehrctl(['audit', 'list', '--since', '1h', '--json'], { env, cwd }))
  t.equal(recent.length, 3)
  const ws2 = parseJson<EntryJson[]>(await ehrctl(['audit', 'list', '--machine', 'ws-2', '--json'], { env, cwd }))
  t.same(ws2.map(r => r.errorCode), ['TOKEN_EXPIRED'])
  const byStatus = parseJson<EntryJson[]>(await ehrctl(['audit', 'list', '--status', '403', '--json'], { env, cwd }))
  t.same(byStatus.map(r => r.errorCode), ['MACHINE_NOT_REGISTERED'])
  const byCode = parseJson<EntryJson[]>(await ehrctl(['audit', 'list', '--code', 'TOKEN_EXPIRED', '--json'], { env, cwd }))
  t.equal(byCode.length, 1)
  const limited = parseJson<EntryJson[]>(await ehrctl(['audit', 'list', '--limit', '2', '--json'], { env, cwd }))
  t.equal(limited.length, 2)

  const table = await ehrctl(['audit', 'list', '--since', '1h'], { env, cwd, tty: true })
  t.equal(table.code, 0)
  t.match(table.stdout, /^TIME +STATUS +CODE +METHOD +PATH +MACHINE +CLIENT IP +REQUEST ID/)
  t.match(table.stdout, /\/fhir\/Patient\?name&birthdate/)
  t.match(table.stdout, /TOKEN_EXPIRED/)
  const none = await ehrctl(['audit', 'list', '--machine', 'nobody'], { env, cwd, tty: true })
  t.match(none.stdout, 'No audit rows match.')
})

t.test('audit list refuses bad options as usage errors', async t => {
  for (const args of [['--since', 'soon'], ['--status', '42'], ['--limit', '0'], ['--code', 'lower']]) {
    const res = await ehrctl(['audit', 'list', ...args, '--json'], { env, cwd })
    t.equal(res.code, 2, args.join(' '))
    t.equal(parseJson<JsonError>(res).error.code, 'USAGE')
  }
})

t.test('audit export streams JSON lines or CSV, oldest first, in a time range', async t => {
  const jsonl = await ehrctl(['audit', 'export', '--since', '4h'], { env, cwd })
  t.equal(jsonl.code, 0, jsonl.stderr)
  const lines = jsonl.stdout.trimEnd().split('\n').map(l => JSON.parse(l) as EntryJson)
  t.same(lines.map(l => l.path), ['/fhir/Patient/old', '/fhir/Patient/1', '/fhir/Patient', '/fhir/Binary/a,"b"'])
  const ranged = await ehrctl(['audit', 'export', '--since', '4h', '--until', '20m', '--format', 'jsonl'], { env, cwd })
  t.equal(ranged.stdout.trimEnd().split('\n').length, 2)

  const csv = await ehrctl(['audit', 'export', '--since', '4h', '--format', 'csv'], { env, cwd })
  t.equal(csv.code, 0)
  const records = csv.stdout.split('\r\n')
  t.equal(records[0], 'id,at,requestId,machineId,machineName,certThumbprint,tokenJti,clientIp,method,route,path,resourceType,resourceId,queryParams,status,errorCode,durationMs,upstreamMs,bytesIn,bytesOut')
  t.equal(records.length, 6, 'header, 4 rows, and the final CRLF')
  t.match(records[4], /,"\/fhir\/Binary\/a,""b""",Patient,1,'=HYPERLINK\(1\),403,MACHINE_NOT_REGISTERED,/, 'quoted, and the formula defused')
  t.match(records[3], /,name birthdate,200,,/)

  const bad = await ehrctl(['audit', 'export', '--since', '1h', '--format', 'xml'], { env, cwd })
  t.equal(bad.code, 2)
  t.equal((await ehrctl(['audit', 'export'], { env, cwd })).code, 2, '--since is required')
})

t.test('csv cells', async t => {
  t.equal(csvCell(null), '')
  t.equal(csvCell('plain'), 'plain')
  t.equal(csvCell('a\nb'), '"a\nb"')
  t.equal(csvCell('-1+1'), "'-1+1")
  t.equal(csvCell(-1), '-1', 'numbers are data, not formulas')
  t.equal(csvCell(new Date(0)), '1970-01-01T00:00:00.000Z')
})

t.test('audit export keeps constant memory: it waits for a slow reader', async t => {
  await repo.insertBatch(Array.from({ length: 2000 }, (_, i) => row({ at: new Date(now - 2 * HOUR + i), path: `/fhir/Patient/bulk-${i}` })))
  let lines = 0
  const res = await ehrctl(['audit', 'export', '--since', '150m'], { env, cwd, stdoutWrite: s => { lines += s.split('\n').length - 1 } })
  t.equal(res.code, 0)
  t.equal(lines, 2000 + 3)
})

t.test('audit prune deletes old rows only, and refuses a retention under a day', async t => {
  const short = await ehrctl(['audit', 'prune', '--older-than', '12h', '--json'], { env, cwd })
  t.equal(short.code, 1)
  t.equal(parseJson<JsonError>(short).error.code, 'AUDIT_RETENTION_TOO_SHORT')
  t.equal((await ehrctl(['audit', 'prune'], { env, cwd })).code, 2, '--older-than is required')

  const res = await ehrctl(['audit', 'prune', '--older-than', '6y'], { env, cwd })
  t.equal(res.code, 0, res.stderr)
  t.match(res.stdout, /^Deleted 1 audit row from before \d{4}-/)
  const json = await ehrctl(['audit', 'prune', '--older-than', '6y', '--json'], { env, cwd })
  t.match(parseJson<{ deleted: number }>(json), { deleted: 0 })
  const left = parseJson<EntryJson[]>(await ehrctl(['audit', 'list', '--limit', '100000', '--json'], { env, cwd }))
  t.notOk(left.some(r => r.path === '/fhir/Patient/ancient'))
  t.equal(left.length, 2004)
})
