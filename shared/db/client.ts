import { connect } from 'node:net'
import postgres from 'postgres'
import type { Options, Sql } from 'postgres'
import type { Config } from '../config.js'
import { GatewayError } from '../errors.js'
import { startEmbeddedPostgres } from './embedded.js'
import type { EmbeddedPostgres } from './embedded.js'

export interface Database {
  readonly sql: Sql
  // Set when DATABASE_URL was unset and an embedded Postgres was started for this process.
  readonly embedded: EmbeddedPostgres | undefined
  close(): Promise<void>
}

export interface OpenOptions {
  // Where the embedded Postgres lives when DATABASE_URL is unset (default ./.data).
  readonly embeddedDir?: string
  readonly log?: (line: string) => void
  readonly maxConnections?: number
}

export async function openDatabase (config: Config, options: OpenOptions = {}): Promise<Database> {
  let embedded: EmbeddedPostgres | undefined
  let url = config.database.url?.reveal()
  if (url === undefined) {
    // loadConfig refuses production without DATABASE_URL; this is the dev/test default.
    embedded = await startEmbeddedPostgres({ dir: options.embeddedDir ?? '.data', ...(options.log === undefined ? {} : { log: options.log }) })
    url = embedded.url
  }
  const sql = postgresClient(url, {
    max: options.maxConnections ?? config.database.poolMax,
    idle_timeout: 60,
    connect_timeout: 10,
    onnotice: () => {},
    transform: postgres.camel,
    // postgres.js looks up array types as each new connection's first query and drops that
    // promise: a connection cut at that moment (failover, pg_terminate_backend) becomes an
    // unhandled rejection that ends the process (porsager/postgres#1192, #1223). No query
    // of ours sends or reads a Postgres array.
    fetch_types: false,
    connection: { application_name: 'ehr-gateway' }
  })
  try {
    await sql`select 1`
  } catch (err) {
    await sql.end({ timeout: 1 })
    await embedded?.stop()
    const reason = (err as { code?: string }).code ?? (err instanceof Error ? err.message : 'unknown error')
    throw new GatewayError('DB_UNREACHABLE', [reason], { cause: err })
  }
  return {
    sql,
    embedded,
    close: async () => {
      await sql.end({ timeout: 5 })
      await embedded?.stop()
    }
  }
}

// postgres(url, options), with TCP_NODELAY, as libpq sets it. postgres.js leaves Nagle's
// algorithm on: a message that leaves in more than one packet (a batch of audit rows, a
// COPY) then holds its last partial packet until the server's delayed ACK, ~40 ms a time
// (a 2-row COPY on loopback took ~85 ms with Nagle, 0.6 ms without). For one TCP host the
// socket is opened here (postgres.js' documented `socket` option, missing from its types);
// a Unix socket has no Nagle, and a list of hosts keeps postgres.js' own failover.
export function postgresClient (url: string, options: Options<{}>): Sql {
  const { host, port, path } = postgres(url, options).options as { host: string[], port: number[], path: unknown }
  const [onlyHost, onlyPort] = [host[0], port[0]]
  if (typeof path === 'string' || host.length !== 1 || onlyHost === undefined || onlyPort === undefined) return postgres(url, options)
  const socket = () => Object.assign(connect({ host: onlyHost, port: onlyPort, noDelay: true }), { host: onlyHost, port: onlyPort })
  return postgres(url, Object.assign({ ...options }, { socket }))
}
