import t from 'tap'
import { createTestDatabase } from '../helpers/db.js'
import { LATEST_VERSION, migrations } from '../../shared/db/migrations.js'
import { ehrctl, parseJson } from './harness.js'
import type { JsonError } from './harness.js'

const cwd = t.testdir()

interface MigrateJson { from: number, to: number, applied: Array<{ version: number, name: string }> }

t.test('db migrate applies every migration once, then nothing', async t => {
  const db = await createTestDatabase(t, { migrate: false })
  const env = { DATABASE_URL: db.url }

  const first = await ehrctl(['db', 'migrate'], { env, cwd })
  t.equal(first.code, 0, first.stderr)
  t.equal(first.stderr, '')
  t.match(first.stdout, `from version 0 to ${LATEST_VERSION}`)
  for (const m of migrations) t.match(first.stdout, m.name)

  const second = await ehrctl(['db', 'migrate'], { env, cwd })
  t.equal(second.code, 0)
  t.match(second.stdout, `at version ${LATEST_VERSION}; nothing to apply`)

  const again = await ehrctl(['db', 'migrate', '--json'], { env, cwd })
  t.equal(again.code, 0)
  t.same(parseJson<MigrateJson>(again), { from: LATEST_VERSION, to: LATEST_VERSION, applied: [] })

  const [row] = await db.sql<Array<{ count: number }>>`select count(*)::int as count from schema_migrations`
  t.equal(row?.count, migrations.length, 'each migration recorded once')
})

t.test('db migrate --json on a fresh database lists what it applied', async t => {
  const db = await createTestDatabase(t, { migrate: false })
  const r = await ehrctl(['--json', 'db', 'migrate'], { env: { DATABASE_URL: db.url }, cwd })
  t.equal(r.code, 0, r.stderr)
  t.same(parseJson<MigrateJson>(r), {
    from: 0,
    to: LATEST_VERSION,
    applied: migrations.map(m => ({ version: m.version, name: m.name }))
  })
})

t.test('commands on registry tables refuse an unmigrated database and say how to fix it', async t => {
  const db = await createTestDatabase(t, { migrate: false })
  const env = { DATABASE_URL: db.url }
  for (const argv of [['machine', 'list'], ['machine', 'show', 'ws-1'], ['machine', 'revoke', 'ws-1'], ['keys', 'list'], ['keys', 'rotate']]) {
    const r = await ehrctl(argv, { env: { ...env, TOKEN_KEY_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64') }, cwd })
    t.equal(r.code, 1, argv.join(' '))
    t.equal(r.stdout, '')
    t.match(r.stderr, /^ehrctl: the database schema is at version 0, this release needs \d+: run `ehrctl db migrate`\n$/)
  }
  const json = await ehrctl(['keys', 'list', '--json'], { env, cwd })
  t.equal(json.code, 1)
  t.equal(json.stderr, '')
  t.equal(parseJson<JsonError>(json).error.code, 'DB_NOT_MIGRATED')
})

t.test('an unreachable database is one line, exit 1', async t => {
  const env = { DATABASE_URL: 'postgres://postgres@127.0.0.1:1/nowhere' }
  const r = await ehrctl(['db', 'migrate'], { env, cwd })
  t.equal(r.code, 1)
  t.match(r.stderr, /^ehrctl: cannot connect to the database: \S+\n$/)
  const json = await ehrctl(['machine', 'list', '--json'], { env, cwd })
  t.equal(json.code, 1)
  t.match(parseJson<JsonError>(json), { error: { code: 'DB_UNREACHABLE', message: /cannot connect/ } })
})

t.test('production refuses to run without DATABASE_URL instead of starting an embedded Postgres', async t => {
  const r = await ehrctl(['db', 'migrate'], { env: { NODE_ENV: 'production' }, cwd })
  t.equal(r.code, 1)
  t.match(r.stderr, /^ehrctl: invalid environment:\n {2}DATABASE_URL: is required when NODE_ENV=production/)
  const json = await ehrctl(['db', 'migrate', '--json'], { env: { NODE_ENV: 'production' }, cwd })
  t.match(parseJson<JsonError>(json), { error: { code: 'CONFIG_INVALID', problems: [{ variable: 'DATABASE_URL' }] } })
})
