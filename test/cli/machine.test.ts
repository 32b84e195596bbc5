import t from 'tap'
import type { Test } from 'tap'
import { createDevCa } from '../../gateway/demo/pki.js'
import { createTestDatabase } from '../helpers/db.js'
import { ehrctl, fingerprintOf, parseJson, writeFiles } from './harness.js'
import type { JsonError, Result } from './harness.js'

const DAY_MS = 24 * 60 * 60 * 1000

interface MachineJson {
  id: string
  name: string
  state: 'active' | 'revoked'
  fingerprint: string
  subject: string
  issuer: string
  serialNumber: string
  notBefore: string
  notAfter: string
  note: string | null
  createdAt: string
  revokedAt: string | null
  revokedReason: string | null
  certificatePem?: string
}

const ca = await createDevCa()
const otherCa = await createDevCa({ commonName: 'some other CA' })
const ws1 = await ca.issueClient({ commonName: 'ws-1' })
const ws2 = await ca.issueClient({ commonName: 'ws-2' })
const ws3 = await ca.issueClient({ commonName: 'ws-3' })
const expired = await ca.issueClient({ commonName: 'old', notBefore: new Date(Date.now() - 2 * DAY_MS), notAfter: new Date(Date.now() - DAY_MS) })
const future = await ca.issueClient({ commonName: 'later', notBefore: new Date(Date.now() + DAY_MS), notAfter: new Date(Date.now() + 2 * DAY_MS) })
const stranger = await otherCa.issueClient({ commonName: 'ws-1' })
const server = await ca.issueServer({ commonName: 'gateway.test' })

const dir = t.testdir()
const files = await writeFiles(dir, {
  'ca.crt': ca.cert,
  'ws1.crt': ws1.cert,
  'ws1.key': ws1.key,
  'ws2.crt': ws2.cert,
  'ws3.crt': ws3.cert,
  'expired.crt': expired.cert,
  'future.crt': future.cert,
  'stranger.crt': stranger.cert,
  'server.crt': server.cert,
  'bundle.crt': ws2.cert + ws3.cert
})

const db = await createTestDatabase(t)
// Exactly what an admin laptop has: no gateway TLS key, no upstream, no key-encryption key.
const env = { DATABASE_URL: db.url, TLS_CLIENT_CA_FILE: files['ca.crt'] }
const cli = async (argv: string[], tty = false): Promise<Result> => await ehrctl(argv, { env, cwd: dir, tty })

async function machineCount (): Promise<number> {
  const [row] = await db.sql<Array<{ count: number }>>`select count(*)::int as count from machines`
  return row?.count ?? -1
}

// A refusal is exit 1, nothing on stdout, exactly one line on stderr; with --json the same
// code as an object on stdout and nothing on stderr. Nothing is written to the registry.
async function refused (t: Test, argv: string[], code: string, message: RegExp): Promise<void> {
  const before = await machineCount()
  const human = await cli(argv)
  t.equal(human.code, 1, `${argv.join(' ')} exits 1`)
  t.equal(human.stdout, '')
  t.match(human.stderr, /^ehrctl: [^\n]+\n$/, 'one line')
  t.match(human.stderr, message)
  const json = await cli([...argv, '--json'])
  t.equal(json.code, 1)
  t.equal(json.stderr, '')
  t.match(parseJson<JsonError>(json), { error: { code, message } })
  t.equal(await machineCount(), before, 'registry unchanged')
}

t.test('machine add registers a certificate with only DATABASE_URL and TLS_CLIENT_CA_FILE', async t => {
  const r = await cli(['machine', 'add', 'ws-1', '--cert', files['ws1.crt'], '--note', 'front desk'])
  t.equal(r.code, 0, r.stderr)
  t.equal(r.stderr, '')
  t.match(r.stdout, /^Name: +ws-1$/m)
  t.match(r.stdout, /^ID: +[0-9a-f-]{36}$/m)
  t.match(r.stdout, `${fingerprintOf(ws1.cert)} (x5t#S256)`)
  t.match(r.stdout, /^Valid: +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ to \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/m)
  t.match(r.stdout, /^Note: +front desk$/m)
  t.match(r.stdout, 'within a second')

  const [row] = await db.sql<Array<{ name: string, fingerprint: string, subject: string, note: string, revokedAt: Date | null }>>`
    select * from machines where name = 'ws-1'`
  t.match(row, { name: 'ws-1', fingerprint: fingerprintOf(ws1.cert), subject: 'CN=ws-1', note: 'front desk', revokedAt: null })
})

t.test('machine add --json returns the registered machine', async t => {
  // A relative --cert is read from the working directory.
  const r = await cli(['machine', 'add', 'ws-2', '--cert', 'ws2.crt', '--json'])
  t.equal(r.code, 0, r.stderr)
  const m = parseJson<MachineJson>(r)
  t.match(m, {
    name: 'ws-2',
    state: 'active',
    fingerprint: fingerprintOf(ws2.cert),
    subject: 'CN=ws-2',
    issuer: 'CN=ehr-gateway dev CA',
    note: null,
    revokedAt: null,
    revokedReason: null
  })
  t.ok(Date.parse(m.notAfter) > Date.now())
  t.ok(Date.parse(m.notBefore) < Date.now())
  t.notOk('certificatePem' in m, 'the PEM is for machine show')
})

t.test('machine add refuses, one line each', async t => {
  await refused(t, ['machine', 'add', 'ws-1', '--cert', files['ws3.crt']], 'MACHINE_NAME_TAKEN', /an active machine is already named 'ws-1'/)
  await refused(t, ['machine', 'add', 'ws-9', '--cert', files['ws1.crt']], 'CERT_ALREADY_REGISTERED', /already registered as machine 'ws-1'/)
  await refused(t, ['machine', 'add', 'ws-9', '--cert', 'missing.crt'], 'FILE_UNREADABLE', /cannot read '.*missing\.crt': ENOENT/)
  await refused(t, ['machine', 'add', 'ws-9', '--cert', files['ws1.key']], 'CERT_NOT_PEM', /does not hold exactly one PEM certificate/)
  await refused(t, ['machine', 'add', 'ws-9', '--cert', files['bundle.crt']], 'CERT_NOT_PEM', /does not hold exactly one PEM certificate/)
  await refused(t, ['machine', 'add', 'ws-9', '--cert', files['expired.crt']], 'CERT_EXPIRED', /expired on \d{4}-/)
  await refused(t, ['machine', 'add', 'ws-9', '--cert', files['future.crt']], 'CERT_EXPIRED', /is not valid before \d{4}-/)
  await refused(t, ['machine', 'add', 'ws-9', '--cert', files['stranger.crt']], 'CERT_NOT_SIGNED_BY_CA', /not signed by the CA in TLS_CLIENT_CA_FILE/)
  await refused(t, ['machine', 'add', 'ws-9', '--cert', files['server.crt']], 'CERT_NOT_FOR_CLIENTS', /TLS client authentication/)
  await refused(t, ['machine', 'add', 'ws-9', '--cert', files['ca.crt']], 'CERT_NOT_FOR_CLIENTS', /is a CA certificate/)
  for (const name of ['WS-9', 'ws 9', '.ws', 'a'.repeat(64), 'ws/9']) {
    await refused(t, ['machine', 'add', name, '--cert', files['ws3.crt']], 'MACHINE_NAME_INVALID', /is not a valid machine name/)
  }
})

t.test('machine add needs TLS_CLIENT_CA_FILE, and a readable one', async t => {
  const missing = await ehrctl(['machine', 'add', 'ws-9', '--cert', files['ws3.crt']], { env: { DATABASE_URL: db.url }, cwd: dir })
  t.equal(missing.code, 1)
  t.equal(missing.stderr, 'ehrctl: invalid environment:\n  TLS_CLIENT_CA_FILE: is required\n')
  const unreadable = await ehrctl(['machine', 'add', 'ws-9', '--cert', files['ws3.crt']], { env: { ...env, TLS_CLIENT_CA_FILE: 'nope.crt' }, cwd: dir })
  t.equal(unreadable.code, 1)
  t.match(unreadable.stderr, /^ehrctl: cannot read '.*nope\.crt': ENOENT\n$/)
})

t.test('machine list shows active machines: a table on a terminal, tab-separated in a pipe', async t => {
  const tty = await cli(['machine', 'list'], true)
  t.equal(tty.code, 0, tty.stderr)
  const [header, ...rows] = tty.stdout.trimEnd().split('\n')
  t.match(header, /^NAME +STATE +FINGERPRINT +NOT AFTER +REGISTERED +REVOKED$/)
  t.equal(rows.length, 2)
  t.match(rows[0], new RegExp(`^ws-1 +active +${fingerprintOf(ws1.cert)} `))
  t.match(rows[1], /^ws-2 +active /)

  const piped = await cli(['machine', 'list'])
  const lines = piped.stdout.trimEnd().split('\n').map(l => l.split('\t'))
  t.equal(lines.length, 2, 'no header in a pipe')
  t.same(lines.map(l => [l[0], l[1], l[2]]), [['ws-1', 'active', fingerprintOf(ws1.cert)], ['ws-2', 'active', fingerprintOf(ws2.cert)]])

  const json = await cli(['machine', 'list', '--json'])
  t.same(parseJson<MachineJson[]>(json).map(m => m.name), ['ws-1', 'ws-2'])
  const global = await cli(['--json', 'machine', 'list'])
  t.equal(global.stdout, json.stdout, '--json works before the noun too')
})

t.test('machine show', async t => {
  const r = await cli(['machine', 'show', 'ws-1'])
  t.equal(r.code, 0, r.stderr)
  t.match(r.stdout, /^State: +active$/m)
  t.match(r.stdout, /^Subject: +CN=ws-1$/m)
  t.notMatch(r.stdout, 'BEGIN CERTIFICATE')
  t.notMatch(r.stdout, /^Revoked:/m)

  const json = parseJson<MachineJson>(await cli(['machine', 'show', 'ws-1', '--json']))
  t.match(json, { name: 'ws-1', state: 'active', note: 'front desk' })
  t.equal(fingerprintOf(json.certificatePem ?? ''), fingerprintOf(ws1.cert), 'PEM of the registered certificate')

  await refused(t, ['machine', 'show', 'nobody'], 'MACHINE_UNKNOWN', /no machine is named 'nobody'/)
})

t.test('machine revoke, twice, and of an unknown machine', async t => {
  const r = await cli(['machine', 'revoke', 'ws-1', '--reason', 'stolen laptop'])
  t.equal(r.code, 0, r.stderr)
  t.match(r.stdout, /^Revoked machine 'ws-1' \(\S+\) at \d{4}-\d\d-\d\dT[\d:]+Z\.$/m)
  t.match(r.stdout, 'within a second')
  const [row] = await db.sql<Array<{ revokedAt: Date | null, revokedReason: string | null }>>`
    select revoked_at, revoked_reason from machines where name = 'ws-1'`
  t.ok(row?.revokedAt instanceof Date)
  t.equal(row?.revokedReason, 'stolen laptop')

  await refused(t, ['machine', 'revoke', 'ws-1'], 'MACHINE_ALREADY_REVOKED', /machine 'ws-1' is already revoked/)
  await refused(t, ['machine', 'revoke', 'nobody'], 'MACHINE_UNKNOWN', /no machine is named 'nobody'/)

  const json = await cli(['machine', 'revoke', 'ws-2', '--json'])
  t.equal(json.code, 0, json.stderr)
  t.match(parseJson<MachineJson>(json), { name: 'ws-2', state: 'revoked', revokedAt: /^\d{4}-/, revokedReason: null })
})

t.test('revoked machines: show, list and list --all', async t => {
  const show = await cli(['machine', 'show', 'ws-1'])
  t.match(show.stdout, /^State: +revoked$/m)
  t.match(show.stdout, /^Revoked: +\d{4}-/m)
  t.match(show.stdout, /^Reason: +stolen laptop$/m)
  t.match(parseJson<MachineJson>(await cli(['machine', 'show', 'ws-1', '--json'])), { state: 'revoked', revokedReason: 'stolen laptop' })

  const active = await cli(['machine', 'list'], true)
  t.equal(active.code, 0)
  t.match(active.stdout, /^No machines registered\./)
  t.equal((await cli(['machine', 'list'])).stdout, '', 'an empty list prints nothing into a pipe')
  t.same(parseJson<MachineJson[]>(await cli(['machine', 'list', '--json'])), [])

  const all = await cli(['machine', 'list', '--all'], true)
  t.match(all.stdout, /^ws-1 +revoked /m)
  t.match(all.stdout, /^ws-2 +revoked /m)
})

t.test('a revoked name can be reused; a revoked certificate cannot', async t => {
  await refused(t, ['machine', 'add', 'ws-new', '--cert', files['ws1.crt']], 'CERT_ALREADY_REGISTERED', /as machine 'ws-1' \(revoked\)/)

  const r = await cli(['machine', 'add', 'ws-1', '--cert', files['ws3.crt'], '--json'])
  t.equal(r.code, 0, r.stderr)
  t.match(parseJson<MachineJson>(r), { name: 'ws-1', state: 'active', fingerprint: fingerprintOf(ws3.cert) })

  t.match(parseJson<MachineJson>(await cli(['machine', 'show', 'ws-1', '--json'])), { state: 'active', fingerprint: fingerprintOf(ws3.cert) },
    'show prefers the active namesake')
  const all = parseJson<MachineJson[]>(await cli(['machine', 'list', '--all', '--json']))
  t.same(all.map(m => [m.name, m.state]), [['ws-1', 'revoked'], ['ws-1', 'active'], ['ws-2', 'revoked']])
  t.same(parseJson<MachineJson[]>(await cli(['machine', 'list', '--json'])).map(m => m.fingerprint), [fingerprintOf(ws3.cert)])
})

t.test('an expired registered certificate is flagged in list and show', async t => {
  const later = () => new Date(Date.now() + 365 * DAY_MS)
  const list = await ehrctl(['machine', 'list'], { env, cwd: dir, tty: true, now: later })
  t.match(list.stdout, /^ws-1 +active +\S+ +\S+ \(expired\)/m)
  const show = await ehrctl(['machine', 'show', 'ws-1'], { env, cwd: dir, now: later })
  t.match(show.stdout, /^Valid: .* \(expired\)$/m)
})
