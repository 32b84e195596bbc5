import type { Sql } from 'postgres'

// The replay store (migration 2): identifiers consumed once across every gateway instance.
export function replayRepository (sql: Sql) {
  // One round trip, atomic: of any number of concurrent calls with one id, exactly one sees
  // `true` (the primary key decides; `on conflict do nothing` never waits on a lock holder
  // beyond the conflicting insert's commit).
  async function consume (id: string, expiresAt: Date): Promise<boolean> {
    const rows = await sql`insert into replay_ids (id, expires_at) values (${id}, ${expiresAt}) on conflict (id) do nothing returning 1 as fresh`
    return rows.length === 1
  }

  // Entries past their expiry protect nothing: the proof or token they stand for is refused
  // by its time check already.
  async function purgeExpired (before: Date): Promise<number> {
    const result = await sql`delete from replay_ids where expires_at < ${before}`
    return result.count
  }

  return { consume, purgeExpired }
}

export type ReplayRepository = ReturnType<typeof replayRepository>
