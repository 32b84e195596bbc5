// `npm test`: runs tap against DATABASE_URL when set, else against an embedded Postgres in a
// temporary directory that is stopped and removed afterwards, whatever the outcome.
import { spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { startEmbeddedPostgres } from '../shared/db/embedded.js'
import type { EmbeddedPostgres } from '../shared/db/embedded.js'

const args = process.argv.slice(2)
let embedded: EmbeddedPostgres | undefined
let dir: string | undefined
const env = { ...process.env }

if (env['DATABASE_URL'] === undefined || env['DATABASE_URL'] === '') {
  dir = await mkdtemp(join(tmpdir(), 'ehrgw-test-pg-'))
  embedded = await startEmbeddedPostgres({ dir, database: 'postgres' })
  env['DATABASE_URL'] = embedded.url
  console.log(`# embedded Postgres for this run in ${dir}`)
}

const tap = spawn(join('node_modules', '.bin', 'tap'), args, { stdio: 'inherit', env })
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => { tap.kill(signal) })
const code = await new Promise<number>(resolve => { tap.on('close', (c, s) => { resolve(c ?? (s === null ? 1 : 128)) }) })
await embedded?.stop()
if (dir !== undefined) await rm(dir, { recursive: true, force: true })
process.exitCode = code
