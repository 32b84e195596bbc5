import { resolve } from 'node:path'
import type { Sql } from 'postgres'
import { ConfigError, loadConfig } from '../shared/config.js'
import type { Config, Env, Need } from '../shared/config.js'
import { openDatabase } from '../shared/db/client.js'
import { assertSchemaCurrent } from '../shared/db/migrations.js'
import { devKeyEncryptionKey } from '../shared/dev-secrets.js'

// What every handler may use. Nothing here is global, so tests hand in their own env,
// clock and working directory.
export interface Context {
  readonly env: Env
  readonly now: () => Date
  readonly cwd: string
  // Absolute path of the .env merged beneath env, or false for none.
  readonly dotenvPath: string | false
}

// The embedded Postgres and the dev key-encryption key live together in ./.data, as the
// gateway keeps them, so ehrctl and a dev gateway started in the same folder agree.
const dataDir = (ctx: Context): string => resolve(ctx.cwd, '.data')

export const resolvePath = (ctx: Context, file: string): string => resolve(ctx.cwd, file)

export function configFor (ctx: Context, needs: readonly Need[]): Config {
  return loadConfig(ctx.env, {
    needs,
    dotenvPath: ctx.dotenvPath,
    devKeyEncryptionKey: devKeyEncryptionKey(dataDir(ctx))
  })
}

// loadConfig already refused a missing variable that `needs` named; this only tells the
// type checker so, without a cast.
export function required<T> (value: T | undefined, variable: string): T {
  if (value === undefined) throw new ConfigError([{ variable, message: 'is required' }])
  return value
}

export interface DatabaseUse {
  // `db migrate` is the one command that must work on an old schema.
  readonly schema: 'current' | 'any'
}

export async function withDatabase<T> (ctx: Context, config: Config, use: DatabaseUse, work: (sql: Sql) => Promise<T>): Promise<T> {
  const db = await openDatabase(config, { embeddedDir: dataDir(ctx), maxConnections: 2 })
  try {
    if (use.schema === 'current') await assertSchemaCurrent(db.sql)
    return await work(db.sql)
  } finally {
    await db.close()
  }
}
