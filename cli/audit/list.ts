import { auditRepository } from '../../shared/db/audit.js'
import type { AuditEntry } from '../../shared/db/audit.js'
import { configFor, withDatabase } from '../context.js'
import type { Context } from '../context.js'
import { formatTime } from '../output.js'
import type { Human } from '../output.js'
import type { Verb } from '../verb.js'

export interface ListAuditInput {
  readonly machine: string | undefined
  // Milliseconds back from now.
  readonly sinceMs: number | undefined
  readonly status: number | undefined
  readonly code: string | undefined
  readonly limit: number
}

async function run (input: ListAuditInput, ctx: Context): Promise<AuditEntry[]> {
  const config = configFor(ctx, ['database'])
  const since = input.sinceMs === undefined ? undefined : new Date(ctx.now().getTime() - input.sinceMs)
  return await withDatabase(ctx, config, { schema: 'current' }, async sql =>
    await auditRepository(sql).list({ machine: input.machine, since, status: input.status, code: input.code }, input.limit))
}

function present (rows: AuditEntry[]): Human {
  return {
    table: {
      columns: ['time', 'status', 'code', 'method', 'path', 'machine', 'client ip', 'request id'],
      rows: rows.map(r => [
        formatTime(r.at),
        String(r.status),
        r.errorCode ?? '-',
        r.method,
        r.path + (r.queryParams.length === 0 ? '' : '?' + r.queryParams.join('&')),
        r.machineName ?? '-',
        r.clientIp ?? '-',
        r.requestId
      ]),
      empty: 'No audit rows match.'
    }
  }
}

export const listAuditVerb: Verb<ListAuditInput, AuditEntry[]> = { run, present }
