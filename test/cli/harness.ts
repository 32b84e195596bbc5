import { X509Certificate, createHash } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { Env } from '../../shared/config.js'
import { run } from '../../cli/program.js'
import type { Io } from '../../cli/program.js'

export interface Result {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
}

export interface RunOptions {
  readonly env: Env
  // Required so no test reads a .env from, or writes .data into, the repository.
  readonly cwd: string
  readonly tty?: boolean
  readonly now?: () => Date
  readonly dotenvPath?: string | false
  readonly stdoutWrite?: (text: string) => void
}

// Runs ehrctl in-process through the same entry the bin uses, capturing both streams.
export async function ehrctl (argv: string[], options: RunOptions): Promise<Result> {
  let stdout = ''
  let stderr = ''
  const io: Io = {
    env: options.env,
    stdout: { write: options.stdoutWrite ?? ((s: string) => { stdout += s }), isTTY: options.tty === true },
    stderr: { write: (s: string) => { stderr += s }, isTTY: options.tty === true },
    now: options.now ?? (() => new Date()),
    cwd: options.cwd,
    dotenvPath: options.dotenvPath ?? false
  }
  const code = await run(argv, io)
  return { code, stdout, stderr }
}

export function parseJson<T> (r: Result): T {
  return JSON.parse(r.stdout) as T
}

export interface JsonError { error: { code: string, message: string, problems?: Array<{ variable: string, message: string }> } }

export function fingerprintOf (pem: string): string {
  return createHash('sha256').update(new X509Certificate(pem).raw).digest('base64url')
}

export async function writeFiles (dir: string, files: Record<string, string>): Promise<Record<string, string>> {
  const paths: Record<string, string> = {}
  for (const [name, content] of Object.entries(files)) {
    paths[name] = join(dir, name)
    await writeFile(paths[name], content, { mode: 0o600 })
  }
  return paths
}
