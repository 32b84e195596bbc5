import type { Sql } from 'postgres'
import { GatewayError } from '../errors.js'

// One row of audit_log (migration 3) as the gateway writes it.
export interface AuditRecord {
  readonly at: Date
  readonly requestId: string
  readonly machineId: string | null
  readonly machineName: string | null
  readonly certThumbprint: string | null
  readonly tokenJti: string | null
  readonly clientIp: string | null
  readonly method: string
  readonly route: string
  // Without the query: parameter names are in queryParams, values nowhere.
  readonly path: string
  readonly resourceType: string | null
  readonly resourceId: string | null
  readonly queryParams: readonly string[]
  readonly status: number
  readonly errorCode: string | null
  readonly durationMs: number
  readonly upstreamMs: number | null
  readonly bytesIn: number
  readonly bytesOut: number
}

export interface AuditEntry extends AuditRecord {
  // bigint: a string, so a consumer never loses digits
  readonly id: string
}

const COLUMN_LIST = 'at, request_id, machine_id, machine_name, cert_thumbprint, token_jti, client_ip, ' +
  'method, route, path, resource_type, resource_id, query_params, status, error_code, duration_ms, ' +
  'upstream_ms, bytes_in, bytes_out'

export interface AuditFilter {
  readonly machine?: string | undefined
  readonly since?: Date | undefined
  readonly until?: Date | undefined
  readonly status?: number | undefined
  readonly code?: string | undefined
}

// Bounds one statement's size: a row is ~600 bytes of array-literal text, at most ~40 KB
// (path capped at 2 KiB, 64 query-parameter names of up to 128 characters, all escaped).
export const MAX_AUDIT_BATCH = 3000
const PRUNE_BATCH = 10_000
const HOUR_MS = 3_600_000
const LIST_WINDOWS_MS = [HOUR_MS, 24 * HOUR_MS, 7 * 24 * HOUR_MS, 31 * 24 * HOUR_MS, 366 * 24 * HOUR_MS]
// The trigger of migration 3 refuses younger rows whatever the caller asks.
export const MIN_AUDIT_RETENTION_MS = 86_400_000

// The text form of a one-dimensional array (Postgres docs §8.15.6). Every string is quoted,
// so inside the quotes only `"` and `\` are special; a number needs no quotes; NULL is the
// bare word. A query_params array rides inside another as one such literal, escaped again.
const ARRAY_SPECIAL = /["\\]/
const ARRAY_SPECIALS = /["\\]/g

export function arrayLiteral<T> (items: readonly T[], value: (item: T) => string | number | null = v => v as string | number | null): string {
  let literal = '{'
  for (let i = 0; i < items.length; i++) {
    const v = value(items[i] as T)
    if (i > 0) literal += ','
    if (v === null) literal += 'NULL'
    else if (typeof v === 'number') literal += String(v)
    else literal += ARRAY_SPECIAL.test(v) ? `"${v.replace(ARRAY_SPECIALS, '\\$&')}"` : `"${v}"`
  }
  return literal + '}'
}

export function auditRepository (sql: Sql) {
  // Explicit casts so numbers arrive as numbers and the address as text.
  const selectList = sql`
    id::text as id, at, request_id::text as request_id, machine_id::text as machine_id, machine_name,
    cert_thumbprint, token_jti, host(client_ip) as client_ip, method, route, path, resource_type,
    resource_id, to_json(query_params) as query_params, status::int as status, error_code, duration_ms, upstream_ms,
    bytes_in::float8 as bytes_in, bytes_out::float8 as bytes_out`

  function where (f: AuditFilter) {
    return sql`where true
      ${f.machine === undefined ? sql`` : sql`and machine_name = ${f.machine}`}
      ${f.since === undefined ? sql`` : sql`and at >= ${f.since}`}
      ${f.until === undefined ? sql`` : sql`and at < ${f.until}`}
      ${f.status === undefined ? sql`` : sql`and status = ${f.status}`}
      ${f.code === undefined ? sql`` : sql`and error_code = ${f.code}`}`
  }

  // One statement, so atomic: a failure wrote nothing. `on conflict do nothing` makes a
  // retry of a batch whose commit was acknowledged too late insert nothing twice. Each column
  // travels as one array literal, unnest()ed back into rows: no 65535-parameter ceiling, no
  // postgres.js array types (client.ts turns their lookup off), and a fifth less Postgres CPU
  // per row than the jsonb_to_recordset this replaced (the bench's audit cost). Returns how
  // many rows were new.
  async function insertBatch (rows: readonly AuditRecord[]): Promise<number> {
    if (rows.length === 0) return 0
    const column = (value: (r: AuditRecord) => string | number | null): string => arrayLiteral(rows, value)
    const result = await sql`
      insert into audit_log (${sql.unsafe(COLUMN_LIST)})
      select at, request_id, machine_id, machine_name, cert_thumbprint, token_jti, client_ip, method,
        route, path, resource_type, resource_id, query_params::text[], status, error_code, duration_ms,
        upstream_ms, bytes_in, bytes_out
      from unnest(
        ${column(r => r.at.toISOString())}::timestamptz[], ${column(r => r.requestId)}::uuid[],
        ${column(r => r.machineId)}::uuid[], ${column(r => r.machineName)}::text[],
        ${column(r => r.certThumbprint)}::text[], ${column(r => r.tokenJti)}::text[],
        ${column(r => r.clientIp)}::inet[], ${column(r => r.method)}::text[], ${column(r => r.route)}::text[],
        ${column(r => r.path)}::text[], ${column(r => r.resourceType)}::text[], ${column(r => r.resourceId)}::text[],
        ${column(r => arrayLiteral(r.queryParams))}::text[], ${column(r => r.status)}::smallint[],
        ${column(r => r.errorCode)}::text[], ${column(r => r.durationMs)}::float8[],
        ${column(r => r.upstreamMs)}::float8[], ${column(r => r.bytesIn)}::int8[], ${column(r => r.bytesOut)}::int8[]
      ) as r (${sql.unsafe(COLUMN_LIST)})
      on conflict (request_id) do nothing`
    return result.count
  }

  // Newest first. No index orders by at (migration 4 made it BRIN), so the newest rows are
  // looked for in growing windows back from now, each a BRIN range scan: a window that holds
  // `limit` matching rows holds the newest `limit`, since every row outside is older than
  // every row inside. Only a filter that matches fewer rows in the last year reads further.
  async function list (filter: AuditFilter, limit: number): Promise<AuditEntry[]> {
    const now = Date.now()
    for (const windowMs of LIST_WINDOWS_MS) {
      const from = new Date(now - windowMs)
      if (filter.since !== undefined && filter.since >= from) break
      const rows = await newest({ ...filter, since: from }, limit)
      if (rows.length === limit) return rows
    }
    return await newest(filter, limit)
  }

  // Ties on `at` by the bigint id, not the `id::text` the select list names `id` (as text,
  // 9 would follow 10).
  async function newest (filter: AuditFilter, limit: number): Promise<AuditEntry[]> {
    return await sql<AuditEntry[]>`
      select ${selectList} from audit_log ${where(filter)}
      order by at desc, audit_log.id desc limit ${limit}`
  }

  // Oldest first, read through a server-side cursor: constant memory for any range.
  async function * stream (filter: AuditFilter, batch = 500): AsyncGenerator<AuditEntry> {
    const cursor = sql<AuditEntry[]>`
      select ${selectList} from audit_log ${where(filter)}
      order by at, audit_log.id`.cursor(batch)
    for await (const rows of cursor) yield * rows
  }

  // The retention job: rows older than `olderThanMs` by the database's clock, in
  // transactions of PRUNE_BATCH rows so a first prune of years of rows holds no long lock.
  // The setting is transaction-local (set_config's third argument), and the trigger
  // refuses anything younger than a day whatever the caller asks.
  async function prune (olderThanMs: number): Promise<number> {
    if (!(olderThanMs >= MIN_AUDIT_RETENTION_MS)) throw new GatewayError('AUDIT_RETENTION_TOO_SHORT', [`${Math.round(olderThanMs / 60_000)} minutes`])
    let total = 0
    for (;;) {
      const deleted = await sql.begin(async tx => {
        await tx`select set_config('ehr_gateway.audit_retention', 'on', true)`
        const result = await tx`
          delete from audit_log where id in (
            select id from audit_log
            where at < now() - make_interval(secs => ${olderThanMs / 1000})
            order by id limit ${PRUNE_BATCH})`
        return result.count
      })
      total += deleted
      if (deleted < PRUNE_BATCH) return total
    }
  }

  return { insertBatch, list, stream, prune }
}
