import type { Sql } from 'postgres'

// One row of audit_log (migration 3) as the gateway writes it.
export interface AuditRecord {
  readonly at: Date
  readonly requestId: string
  readonly machineId: string | null
  readonly machineName: string | null
  readonly certThumbprint: string | null
  readonly tokenJti: string | null
  readonly clientIp: string
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

export const AUDIT_COLUMNS = [
  'at', 'requestId', 'machineId', 'machineName', 'certThumbprint', 'tokenJti', 'clientIp', 'method',
  'route', 'path', 'resourceType', 'resourceId', 'queryParams', 'status', 'errorCode', 'durationMs',
  'upstreamMs', 'bytesIn', 'bytesOut'
] as const satisfies ReadonlyArray<keyof AuditRecord>

export interface AuditFilter {
  readonly machine?: string | undefined
  readonly since?: Date | undefined
  readonly until?: Date | undefined
  readonly status?: number | undefined
  readonly code?: string | undefined
}

// Postgres allows 65535 parameters per statement; 19 columns a row.
export const MAX_AUDIT_BATCH = 3000
const PRUNE_BATCH = 10_000

export function auditRepository (sql: Sql) {
  // Explicit casts so numbers arrive as numbers and the address as text.
  const selectList = sql`
    id::text as id, at, request_id::text as request_id, machine_id::text as machine_id, machine_name,
    cert_thumbprint, token_jti, host(client_ip) as client_ip, method, route, path, resource_type,
    resource_id, query_params, status::int as status, error_code, duration_ms, upstream_ms,
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
  // retry of a batch whose commit was acknowledged too late insert nothing twice.
  // Returns how many rows were new.
  async function insertBatch (rows: readonly AuditRecord[]): Promise<number> {
    if (rows.length === 0) return 0
    const values = rows.map(r => ({ ...r, queryParams: [...r.queryParams] }))
    const result = await sql`
      insert into audit_log ${sql(values, ...AUDIT_COLUMNS)}
      on conflict (request_id) do nothing`
    return result.count
  }

  // Newest first.
  async function list (filter: AuditFilter, limit: number): Promise<AuditEntry[]> {
    return await sql<AuditEntry[]>`
      select ${selectList} from audit_log ${where(filter)}
      order by at desc, id desc limit ${limit}`
  }

  // Oldest first, read through a server-side cursor: constant memory for any range.
  async function * stream (filter: AuditFilter, batch = 500): AsyncGenerator<AuditEntry> {
    const cursor = sql<AuditEntry[]>`
      select ${selectList} from audit_log ${where(filter)}
      order by at, id`.cursor(batch)
    for await (const rows of cursor) yield * rows
  }

  // The retention job: rows older than `olderThanMs` by the database's clock, in
  // transactions of PRUNE_BATCH rows so a first prune of years of rows holds no long lock.
  // The setting is transaction-local (set_config's third argument), and the trigger
  // refuses anything younger than a day whatever the caller asks.
  async function prune (olderThanMs: number): Promise<number> {
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
