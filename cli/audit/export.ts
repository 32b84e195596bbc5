import { once } from 'node:events'
import { auditRepository } from '../../shared/db/audit.js'
import type { AuditEntry } from '../../shared/db/audit.js'
import { configFor, withDatabase } from '../context.js'
import type { Context } from '../context.js'
import type { Stream } from '../output.js'

export type ExportFormat = 'jsonl' | 'csv'

export interface ExportAuditInput {
  readonly sinceMs: number
  readonly untilMs: number | undefined
  readonly format: ExportFormat
}

const CSV_COLUMNS = [
  'id', 'at', 'requestId', 'machineId', 'machineName', 'certThumbprint', 'tokenJti', 'clientIp',
  'method', 'route', 'path', 'resourceType', 'resourceId', 'queryParams', 'status', 'errorCode',
  'durationMs', 'upstreamMs', 'bytesIn', 'bytesOut'
] as const satisfies ReadonlyArray<keyof AuditEntry>

// RFC 4180 quoting; and a text cell a spreadsheet would run as a formula (=, +, -, @ first)
// gets a leading apostrophe (OWASP "CSV injection"), since SIEM exports end up in Excel.
export function csvCell (value: unknown): string {
  if (value === null || value === undefined) return ''
  let text = value instanceof Date ? value.toISOString() : Array.isArray(value) ? value.join(' ') : String(value)
  if (typeof value !== 'number' && /^[=+\-@\t\r]/.test(text)) text = `'${text}`
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text
}

async function write (out: Stream, text: string): Promise<void> {
  // Backpressure: a slow reader (a SIEM's pipe) must not make us buffer the whole table.
  const emitter = out as Stream & Partial<NodeJS.EventEmitter>
  if (out.write(text) === false && typeof emitter.once === 'function') await once(emitter as NodeJS.EventEmitter, 'drain')
}

// Streams the rows oldest first through a cursor: constant memory however long the range.
// Returns the number of rows written.
export async function exportAudit (input: ExportAuditInput, ctx: Context, out: Stream): Promise<number> {
  const config = configFor(ctx, ['database'])
  const now = ctx.now().getTime()
  const since = new Date(now - input.sinceMs)
  const until = input.untilMs === undefined ? undefined : new Date(now - input.untilMs)
  return await withDatabase(ctx, config, { schema: 'current' }, async sql => {
    let n = 0
    if (input.format === 'csv') await write(out, CSV_COLUMNS.join(',') + '\r\n')
    for await (const row of auditRepository(sql).stream({ since, until })) {
      await write(out, input.format === 'csv'
        ? CSV_COLUMNS.map(c => csvCell(row[c])).join(',') + '\r\n'
        : JSON.stringify(row) + '\n')
      n++
    }
    return n
  })
}
