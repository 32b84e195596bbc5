import { ConfigError } from '../shared/config.js'
import { isGatewayError } from '../shared/errors.js'

export interface Stream {
  write(text: string): unknown
  readonly isTTY?: boolean
}

export interface Table {
  readonly columns: readonly string[]
  readonly rows: ReadonlyArray<readonly string[]>
  // Shown on a terminal when there are no rows; a pipe gets nothing, so `| wc -l` is 0.
  readonly empty?: string
}

// What a verb shows a person; --json shows the verb's data instead.
export interface Human {
  readonly fields?: ReadonlyArray<readonly [string, string]>
  readonly table?: Table
  readonly notes?: readonly string[]
}

export function formatTime (date: Date | null | undefined): string {
  return date == null ? '-' : date.toISOString().replace(/\.\d{3}Z$/, 'Z')
}

// Undefined becomes null so a JSON consumer sees every field, set or not.
export function toJson (data: unknown): string {
  return JSON.stringify(data, (_key, value: unknown) => value === undefined ? null : value, 2) + '\n'
}

function padRows (rows: ReadonlyArray<readonly string[]>): string[] {
  const widths: number[] = []
  for (const row of rows) row.forEach((cell, i) => { widths[i] = Math.max(widths[i] ?? 0, cell.length) })
  return rows.map(row => row.map((cell, i) => i === row.length - 1 ? cell : cell.padEnd(widths[i] ?? 0)).join('  ').trimEnd())
}

function renderTable (table: Table, tty: boolean): string[] {
  if (table.rows.length === 0) return tty && table.empty !== undefined ? [table.empty] : []
  // A terminal gets aligned columns under a header; a pipe gets tab-separated rows that
  // `cut` and `awk` can read, as gh does.
  if (!tty) return table.rows.map(row => row.join('\t'))
  return padRows([table.columns.map(c => c.toUpperCase()), ...table.rows])
}

function renderFields (fields: ReadonlyArray<readonly [string, string]>): string[] {
  const width = Math.max(...fields.map(([label]) => label.length)) + 1
  return fields.map(([label, value]) => `${`${label}:`.padEnd(width)} ${value}`)
}

export function render (out: Stream, json: boolean, data: unknown, human: Human): void {
  if (json) {
    out.write(toJson(data))
    return
  }
  const tty = out.isTTY === true
  const lines: string[] = []
  if (human.fields !== undefined && human.fields.length > 0) lines.push(...renderFields(human.fields))
  if (human.table !== undefined) lines.push(...renderTable(human.table, tty))
  if (human.notes !== undefined) lines.push(...human.notes)
  if (lines.length > 0) out.write(lines.join('\n') + '\n')
}

export interface ErrorStreams { readonly stdout: Stream, readonly stderr: Stream }

// One line for the person (CONFIG_INVALID adds one per problem), no stack trace; with
// --json the same facts as an object on stdout, where the consumer is already reading.
export function renderError (io: ErrorStreams, json: boolean, err: unknown): void {
  const code = isGatewayError(err) ? err.code : 'INTERNAL_ERROR'
  const message = isGatewayError(err)
    ? err.message
    : (err instanceof Error ? err.message : String(err)).split('\n')[0] ?? 'unknown error'
  if (json) {
    const error = err instanceof ConfigError ? { code, message, problems: err.problems } : { code, message }
    io.stdout.write(toJson({ error }))
    return
  }
  io.stderr.write(`ehrctl: ${message}\n`)
}

export function renderUsageError (out: Stream, message: string): void {
  out.write(toJson({ error: { code: 'USAGE', message: message.replace(/^error: /, '').trim() } }))
}
