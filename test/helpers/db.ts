import { randomBytes } from 'node:crypto'
import postgres from 'postgres'
import type { Sql } from 'postgres'
import type { Test } from 'tap'
import { postgresClient } from '../../shared/db/client.js'
import { migrate } from '../../shared/db/migrations.js'

// DATABASE_URL here is the admin connection test/run.ts provides (the embedded Postgres)
// or CI's local server. Each test file gets a database of its own, dropped at teardown.
export function adminUrl (): string {
  const url = process.env['DATABASE_URL']
  if (url === undefined || url === '') throw new Error('DATABASE_URL is unset: run the suite with `npm test`')
  return url
}

export interface TestDatabase {
  readonly url: string
  readonly sql: Sql
}

export async function createTestDatabase (t: Test, options: { migrate?: boolean } = {}): Promise<TestDatabase> {
  const name = `ehrgw_test_${randomBytes(6).toString('hex')}`
  const admin = postgres(adminUrl(), { max: 1, onnotice: () => {} })
  await admin.unsafe(`create database ${name}`)
  const url = new URL(adminUrl())
  url.pathname = `/${name}`
  // As shared/db/client.ts opens it (fetch_types: see there).
  const sql = postgresClient(url.toString(), { max: 4, onnotice: () => {}, transform: postgres.camel, fetch_types: false })
  if (options.migrate !== false) await migrate(sql)
  t.teardown(async () => {
    await sql.end({ timeout: 1 })
    await admin.unsafe(`drop database if exists ${name} with (force)`)
    await admin.end({ timeout: 1 })
  })
  return { url: url.toString(), sql }
}

// Holds an exclusive lock on replay_ids until released: a store that hangs.
export async function lockReplayStore (url: string): Promise<() => Promise<void>> {
  const locker = postgres(url, { max: 1, onnotice: () => {} })
  let release = (): void => {}
  const released = new Promise<void>(resolve => { release = resolve })
  let locked = (): void => {}
  const lockTaken = new Promise<void>(resolve => { locked = resolve })
  const holding = locker.begin(async tx => {
    await tx`lock table replay_ids in access exclusive mode`
    locked()
    await released
  })
  await lockTaken
  return async () => {
    release()
    // The test database may have been dropped (with its connections) first.
    await holding.catch(() => {})
    await locker.end({ timeout: 1 })
  }
}
