import type { Sql } from 'postgres'

export interface ReplayEntry {
  readonly id: string
  readonly expiresAt: Date
}

// Bounds one statement's size (an entry is under 400 bytes of JSON).
export const MAX_REPLAY_BATCH = 1000
// The check of migration 2, counted in UTF-16 units, which never undercount its characters.
const MAX_REPLAY_ID_LENGTH = 300
// NUL and lone surrogates: text Postgres refuses (in text and in jsonb alike).
const UNSTORABLE = /[\0\p{Cs}]/u

// Whether Postgres can store `id` at all. Checked before an id joins a batch, so one
// unstorable id (a proof's jti is the client's choice) cannot fail the statement for the
// other ids in it.
export function storableReplayId (id: string): boolean {
  return id.length <= MAX_REPLAY_ID_LENGTH && !UNSTORABLE.test(id)
}

// The replay store (migration 2): identifiers consumed once across every gateway instance.
export function replayRepository (sql: Sql) {
  // One statement for up to MAX_REPLAY_BATCH ids, atomic: a failure consumed none of them.
  // Returns the ids that were new. Of any number of concurrent statements holding one id,
  // exactly one returns it: the primary key decides, and `on conflict do nothing` waits only
  // for the conflicting insert's commit. A statement holding one id twice returns it once
  // (Postgres skips the second row), so a caller must not read that as two fresh uses.
  // `order by id`: every statement takes its row locks in one order, so two statements
  // holding the same ids (a proof replayed to two instances at once) cannot deadlock. The
  // ids travel as one jsonb parameter, as audit rows do (no array parameter: see client.ts).
  async function consumeBatch (entries: readonly ReplayEntry[]): Promise<Set<string>> {
    if (entries.length === 0) return new Set()
    const json = sql.json(entries.map(e => ({ id: e.id, expires_at: e.expiresAt.toISOString() })))
    const rows = await sql<Array<{ id: string }>>`
      insert into replay_ids (id, expires_at)
      select id, expires_at from jsonb_to_recordset(${json}) as r (id text, expires_at timestamptz)
      order by id
      on conflict (id) do nothing
      returning id`
    return new Set(rows.map(r => r.id))
  }

  // Entries past their expiry protect nothing: the proof or token they stand for is refused
  // by its time check already.
  async function purgeExpired (before: Date): Promise<number> {
    const result = await sql`delete from replay_ids where expires_at < ${before}`
    return result.count
  }

  return { consumeBatch, purgeExpired }
}

export type ReplayRepository = ReturnType<typeof replayRepository>
