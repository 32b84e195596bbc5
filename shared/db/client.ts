import postgres from 'postgres'
import type { Sql } from 'postgres'
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
  const sql = postgres(url, {
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
