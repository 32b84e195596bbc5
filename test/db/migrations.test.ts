import t from 'tap'
import { GatewayError } from '../../shared/errors.js'
import { LATEST_VERSION, assertSchemaCurrent, migrate, migrations, schemaVersion } from '../../shared/db/migrations.js'
import { createTestDatabase } from '../helpers/db.js'

t.test('migrate is idempotent and safe to run concurrently', async t => {
  const { sql } = await createTestDatabase(t, { migrate: false })
  t.equal(await schemaVersion(sql), 0)
  await t.rejects(assertSchemaCurrent(sql), { code: 'DB_NOT_MIGRATED', message: /ehrctl db migrate/ })
  const results = await Promise.all([migrate(sql), migrate(sql), migrate(sql)])
  t.equal(results.reduce((n, r) => n + r.applied.length, 0), migrations.length, 'each migration applied once')
  t.equal(await schemaVersion(sql), LATEST_VERSION)
  const again = await migrate(sql)
  t.same(again.applied, [])
  t.equal(again.from, LATEST_VERSION)
  await assertSchemaCurrent(sql)
})

t.test('a schema newer than this release is refused', async t => {
  const { sql } = await createTestDatabase(t)
  await sql`insert into schema_migrations (version, name) values (${LATEST_VERSION + 1}, 'from the future')`
  await t.rejects(assertSchemaCurrent(sql), new GatewayError('DB_SCHEMA_TOO_NEW', [LATEST_VERSION + 1, LATEST_VERSION]))
  await t.rejects(migrate(sql), { code: 'DB_SCHEMA_TOO_NEW' })
})

// Every audit_log index is paid on every audited request (migration 4 chose these).
t.test('audit_log carries exactly the indexes migration 4 chose', async t => {
  const { sql } = await createTestDatabase(t)
  const indexes = await sql<Array<{ indexname: string, indexdef: string }>>`select indexname, indexdef from pg_indexes where tablename = 'audit_log' order by indexname`
  t.same(indexes.map(i => i.indexname), ['audit_log_at_brin', 'audit_log_code', 'audit_log_machine', 'audit_log_pkey', 'audit_log_request_id_key'])
  t.match(indexes.find(i => i.indexname === 'audit_log_at_brin')?.indexdef, /USING brin \(at\) WITH \(autosummarize='?on'?\)/)
})
