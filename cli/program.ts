import { Command, CommanderError, InvalidArgumentError, Option } from 'commander'
import type { OptionValues } from 'commander'
import { resolve } from 'node:path'
import type { Env } from '../shared/config.js'
import { parseDuration } from '../shared/duration.js'
import { exportAudit } from './audit/export.js'
import type { ExportFormat } from './audit/export.js'
import { listAuditVerb } from './audit/list.js'
import { pruneAuditVerb } from './audit/prune.js'
import { checkConfigVerb } from './config/check.js'
import type { Context } from './context.js'
import { migrateVerb } from './db/migrate.js'
import { listKeysVerb } from './keys/list.js'
import { rotateKeysVerb } from './keys/rotate.js'
import { addMachineVerb } from './machine/add.js'
import { listMachinesVerb } from './machine/list.js'
import { revokeMachineVerb } from './machine/revoke.js'
import { showMachineVerb } from './machine/show.js'
import { render, renderError, renderUsageError } from './output.js'
import type { Stream } from './output.js'
import type { Verb } from './verb.js'

export interface Io {
  readonly env: Env
  readonly stdout: Stream
  readonly stderr: Stream
  readonly now: () => Date
  readonly cwd: string
  // A .env file (relative to cwd) merged beneath env; the bin passes '.env'.
  readonly dotenvPath?: string | false
}

type Parse<I> = (args: readonly string[], options: OptionValues) => I

const none = (): Record<string, never> => ({})
const text = (value: unknown): string | null => typeof value === 'string' ? value : null
const optional = <T>(value: unknown): T | undefined => value === undefined ? undefined : value as T

// Option values checked while parsing, so a bad one is bad usage (exit 2).
function durationArg (value: string): number {
  const ms = parseDuration(value)
  if (ms === undefined || ms <= 0) throw new InvalidArgumentError("expected a duration such as '90m', '1h', '7d' or '6y'")
  return ms
}
const integerArg = (min: number, max: number) => (value: string): number => {
  if (!/^\d+$/.test(value) || Number(value) < min || Number(value) > max) throw new InvalidArgumentError(`expected an integer from ${min} to ${max}`)
  return Number(value)
}
function codeArg (value: string): string {
  if (!/^[A-Z][A-Z0-9_]*$/.test(value)) throw new InvalidArgumentError('expected an error code such as TOKEN_EXPIRED')
  return value
}

// Only arguments before `--` are options; `--json` there asks for JSON errors too, even
// when parsing itself failed.
function wantsJson (argv: readonly string[]): boolean {
  const end = argv.indexOf('--')
  return (end === -1 ? argv : argv.slice(0, end)).includes('--json')
}

function build (io: Io, ctx: Context, json: boolean): Command {
  const program = new Command('ehrctl')
  program
    .description('Administer the ehr-gateway: machine registry, signing keys, audit trail, database, configuration.')
    .exitOverride()
    .configureOutput({
      writeOut: s => { io.stdout.write(s) },
      writeErr: s => { io.stderr.write(s) },
      // With --json the error goes to stdout as an object instead (see run).
      outputError: (s, write) => { if (!json) write(s) },
      getOutHelpWidth: () => 100,
      getErrHelpWidth: () => 100,
      getOutHasColors: () => false,
      getErrHasColors: () => false
    })
    .configureHelp({ showGlobalOptions: true })
    // commander writes this hint to stderr directly, past outputError, so --json skips it.
    .showHelpAfterError(json ? false : '(add --help for usage)')
    // Accepted before or after the verb: `ehrctl --json machine list`, `ehrctl machine list --json`.
    .option('--json', 'print machine-readable JSON on stdout (errors too)')

  function verb<I, O> (cmd: Command, spec: Verb<I, O>, parse: Parse<I>): void {
    cmd.action(async function (this: Command) {
      const args = this.processedArgs.map(a => String(a))
      const input = parse(args, this.opts())
      const output = await spec.run(input, ctx)
      render(io.stdout, this.optsWithGlobals<{ json?: boolean }>().json === true, output, spec.present(output, ctx))
    })
  }

  const db = program.command('db').description('database schema')
  verb(db.command('migrate').description('apply pending schema migrations (safe to repeat; needs DATABASE_URL)'),
    migrateVerb, none)

  const machine = program.command('machine').description('registry of workstations allowed through the gateway')
  verb(machine.command('add')
    .description('register a workstation by its client certificate (needs DATABASE_URL, TLS_CLIENT_CA_FILE)')
    .argument('<name>', 'machine name: 1-63 of a-z 0-9 . _ -, starting with a letter or digit')
    .requiredOption('--cert <pem-file>', "the machine's client certificate (PEM)")
    .option('--note <text>', 'free text kept with the machine'),
  addMachineVerb, ([name], o) => ({ name: name ?? '', certFile: text(o['cert']) ?? '', note: text(o['note']) }))
  verb(machine.command('list')
    .description('list active machines')
    .option('--all', 'include revoked machines'),
  listMachinesVerb, (_args, o) => ({ all: o['all'] === true }))
  verb(machine.command('show')
    .description('show one machine (--json includes the certificate PEM)')
    .argument('<name>', 'machine name'),
  showMachineVerb, ([name]) => ({ name: name ?? '' }))
  verb(machine.command('revoke')
    .description('revoke a machine; running gateways refuse it within a second')
    .argument('<name>', 'machine name')
    .option('--reason <text>', 'why, kept with the machine'),
  revokeMachineVerb, ([name], o) => ({ name: name ?? '', reason: text(o['reason']) }))

  const keys = program.command('keys').description('token signing keys')
  verb(keys.command('list').description('list signing keys: current, retired (still verifying) and expired'),
    listKeysVerb, none)
  verb(keys.command('rotate').description('make a new current signing key (needs TOKEN_KEY_ENCRYPTION_KEY outside dev)'),
    rotateKeysVerb, none)

  const audit = program.command('audit').description('the audit trail: one row per request to the EHR proxy or the token endpoint')
  verb(audit.command('list')
    .description('list audit rows, newest first')
    .option('--machine <name>', 'only this machine')
    .option('--since <duration>', "only rows this recent, e.g. '1h', '7d'", durationArg)
    .option('--status <n>', 'only this HTTP status', integerArg(100, 599))
    .option('--code <CODE>', 'only this error code', codeArg)
    .option('--limit <n>', 'at most this many rows (default 100)', integerArg(1, 100_000)),
  listAuditVerb, (_args, o) => ({
    machine: optional<string>(o['machine']),
    sinceMs: optional<number>(o['since']),
    status: optional<number>(o['status']),
    code: optional<string>(o['code']),
    limit: optional<number>(o['limit']) ?? 100
  }))
  audit.command('export')
    .description('stream audit rows, oldest first, to stdout for a SIEM (constant memory)')
    .requiredOption('--since <duration>', "rows this recent, e.g. '24h'", durationArg)
    .option('--until <duration>', "and older than this, e.g. '1h'", durationArg)
    .addOption(new Option('--format <format>', 'output format').choices(['jsonl', 'csv']).default('jsonl'))
    .action(async function (this: Command) {
      const o = this.opts()
      const n = await exportAudit({
        sinceMs: o['since'] as number,
        untilMs: optional<number>(o['until']),
        format: o['format'] as ExportFormat
      }, ctx, io.stdout)
      // stdout is the data; the count is for the person watching.
      if (io.stderr.isTTY === true) io.stderr.write(`Exported ${n} audit row${n === 1 ? '' : 's'}.\n`)
    })
  verb(audit.command('prune')
    .description('delete audit rows older than a duration (at least 1d); needs a role allowed to DELETE from audit_log')
    .requiredOption('--older-than <duration>', "e.g. '6y' (HIPAA documentation retention)", durationArg),
  pruneAuditVerb, (_args, o) => ({ olderThanMs: o['olderThan'] as number }))

  const config = program.command('config').description('gateway configuration')
  verb(config.command('check').description('validate the environment and TLS files; print the effective config, secrets redacted')
    .option('--probe', 'also fetch one upstream access token to prove the credentials work (prints only its expiry)'),
  checkConfigVerb, (_args, o) => ({ probe: o['probe'] === true }))

  return program
}

// Exit codes: 0 success, 1 a failure the user can fix (the message says how), 2 bad usage.
export async function run (argv: string[], io: Io): Promise<number> {
  const json = wantsJson(argv)
  const ctx: Context = {
    env: io.env,
    now: io.now,
    cwd: io.cwd,
    dotenvPath: io.dotenvPath === undefined || io.dotenvPath === false ? false : resolve(io.cwd, io.dotenvPath)
  }
  try {
    await build(io, ctx, json).parseAsync(argv, { from: 'user' })
    return 0
  } catch (err) {
    if (err instanceof CommanderError) {
      // --help, `help` and --version end through the same path with exit code 0.
      if (err.exitCode === 0) return 0
      if (json) renderUsageError(io.stdout, err.code === 'commander.help' ? 'a command is required' : err.message)
      return 2
    }
    renderError(io, json, err)
    return 1
  }
}
