import { randomBytes } from 'node:crypto'
import postgres from 'postgres'
import type { Sql } from 'postgres'
import t from 'tap'
import type { Test } from 'tap'
import { MAX_STATEMENTS_IN_FLIGHT, MAX_WAITING_CONSUMES, ReplayStore } from '../../gateway/replay.js'
import { MAX_REPLAY_BATCH } from '../../shared/db/replay.js'
import { GatewayError } from '../../shared/errors.js'
import { createTestDatabase, lockReplayStore } from '../helpers/db.js'

// The replay store as an attacker meets it: the same proof or token sent many times at
// once, to one instance or several, while the database is fine, slow, locked or gone.

const expiry = (): number => Date.now() + 60_000
const newId = (): string => `test:${randomBytes(12).toString('base64url')}`

type Outcome = boolean | string
// true/false, or the code of the refusal (anything but a GatewayError fails the test).
async function outcome (consume: Promise<boolean>): Promise<Outcome> {
  try {
    return await consume
  } catch (err) {
    return err instanceof GatewayError ? err.code : `not a GatewayError: ${String(err)}`
  }
}

// Every id consumed at once, as a burst of requests would.
async function consumeAll (store: ReplayStore, ids: readonly string[]): Promise<Outcome[]> {
  return await Promise.all(ids.map(async id => await outcome(store.consume(id, expiry()))))
}

// A second client on the same database, as a second gateway instance has; it records the
// size of each consume statement it sends.
function instance (t: Test, url: string): { sql: Sql, store: ReplayStore, batches: number[] } {
  const batches: number[] = []
  const sql = postgres(url, {
    max: 4,
    onnotice: () => {},
    transform: postgres.camel,
    fetch_types: false,
    debug: (_connection, query, parameters) => {
      // The parameter as given to sql.json, before serialisation.
      if (query.includes('insert into replay_ids')) batches.push((parameters[0] as unknown[]).length)
    }
  })
  const store = new ReplayStore(sql, { now: Date.now, onCleanupError: () => {} })
  t.teardown(async () => {
    store.close()
    await sql.end({ timeout: 1 })
  })
  return { sql, store, batches }
}

const settledWithin = async (promises: ReadonlyArray<Promise<Outcome>>, ms: number): Promise<number> => {
  let settled = 0
  for (const p of promises) void p.then(() => { settled++ })
  await new Promise(resolve => setTimeout(resolve, ms))
  return settled
}

t.test('one id consumed many times at once: exactly one first use, within a batch, across batches and instances', async t => {
  const { url } = await createTestDatabase(t)
  const a = instance(t, url)
  const b = instance(t, url)
  for (let round = 0; round < 5; round++) {
    const id = newId()
    const all = await Promise.all(Array.from({ length: 200 }, (_, i) => outcome((i % 2 === 0 ? a : b).store.consume(id, expiry()))))
    t.equal(all.filter(r => r === true).length, 1, `round ${round}: one true`)
    t.equal(all.filter(r => r === false).length, 199, `round ${round}: the rest false, none refused`)
  }
  // A repeated id goes into a statement once, so the batching shows in the statement count.
  t.ok(a.batches.length <= 5 * 10, `instance a's 500 consumes went in ${a.batches.length} statements`)

  // Many ids, each three times, shuffled over both instances.
  const ids = Array.from({ length: 600 }, newId)
  const uses = [...ids, ...ids, ...ids].map(id => ({ id, on: Math.random() < 0.5 ? a : b })).sort(() => Math.random() - 0.5)
  const results = await Promise.all(uses.map(async u => ({ id: u.id, fresh: await outcome(u.on.store.consume(u.id, expiry())) })))
  const wins = new Map<string, number>()
  for (const r of results) if (r.fresh === true) wins.set(r.id, (wins.get(r.id) ?? 0) + 1)
  t.equal(wins.size, ids.length, 'every id had a first use')
  t.ok([...wins.values()].every(n => n === 1), 'and only one')
  t.equal(results.filter(r => typeof r.fresh === 'string').length, 0, 'none refused')
  const [row] = await a.sql<Array<{ n: number }>>`select count(*)::int as n from replay_ids where id like 'test:%'`
  t.equal(row?.n, ids.length + 5, 'one row per id')
})

t.test('a burst larger than a batch: statements of at most MAX_REPLAY_BATCH ids, every consume answered', async t => {
  const { url } = await createTestDatabase(t)
  const a = instance(t, url)
  const burst = MAX_REPLAY_BATCH * 2 + 500
  const all = await Promise.all(Array.from({ length: burst }, async () => await outcome(a.store.consume(newId(), expiry()))))
  t.equal(all.filter(r => r === true).length, burst, 'all fresh')
  t.ok(a.batches.every(n => n <= MAX_REPLAY_BATCH), `no statement over the cap (${a.batches.join(', ')})`)
  t.ok(a.batches.length <= burst / 100, `few statements: ${a.batches.length}`)
})

t.test('ids Postgres cannot store are refused alone and never fail a batch', async t => {
  const { url } = await createTestDatabase(t)
  const a = instance(t, url)
  const good = Array.from({ length: 20 }, newId)
  const bad = ['x'.repeat(301), 'dpop:a\u0000b', 'dpop:a\ud800b']
  const results = await Promise.all([...good, ...bad].map(async (id, i) => await outcome(a.store.consume(id, expiry() + i))))
  t.same(results.slice(0, good.length), good.map(() => true), 'the good ids beside them are consumed')
  t.same(results.slice(good.length), bad.map(() => 'REPLAY_STORE_UNAVAILABLE'), 'the bad ones refused, closed')
  t.equal(await outcome(a.store.consume('x'.repeat(300), expiry())), true, 'the longest id the table allows works')
})

t.test('fails closed: a failed statement refuses its whole batch and consumes nothing', async t => {
  const { url, sql } = await createTestDatabase(t)
  const a = instance(t, url)
  await sql`alter table replay_ids rename to replay_ids_away`
  const ids = Array.from({ length: 50 }, newId)
  const refused = await consumeAll(a.store, ids)
  t.same(refused, ids.map(() => 'REPLAY_STORE_UNAVAILABLE'), 'every waiter refused')
  t.ok(a.batches.length < ids.length, `in ${a.batches.length} statements`)
  await sql`alter table replay_ids_away rename to replay_ids`
  const again = await consumeAll(a.store, ids)
  t.same(again, ids.map(() => true), 'back: none of the refused ids was consumed')
})

t.test('fails closed: a store that hangs refuses within the timeout, and a late commit is fresh to no one', async t => {
  const { url } = await createTestDatabase(t)
  const a = instance(t, url)
  const release = await lockReplayStore(url)
  const ids = Array.from({ length: 50 }, newId)
  const started = Date.now()
  const refused = await consumeAll(a.store, ids)
  const waited = Date.now() - started
  t.same(refused, ids.map(() => 'REPLAY_STORE_UNAVAILABLE'), 'every waiter refused')
  t.ok(waited >= 1900 && waited < 4000, `after the 2 s timeout (${waited} ms)`)
  // Still locked: later consumes wait behind the hung statements and time out too.
  t.equal(await outcome(a.store.consume(newId(), expiry())), 'REPLAY_STORE_UNAVAILABLE', 'still refused while hung')

  await release()
  // The statements that were sent commit now; their ids were refused and stay consumed.
  // The consumes that timed out while waiting were never sent, so their ids are free.
  const later = await consumeAll(a.store, ids)
  t.equal(later.filter(r => typeof r === 'string').length, 0, 'the store works again')
  const burnt = later.filter(r => r === false).length
  t.ok(burnt >= 1 && burnt <= MAX_STATEMENTS_IN_FLIGHT * MAX_REPLAY_BATCH, `${burnt} ids committed late: refused then, consumed now`)
  t.ok(later.filter(r => r === true).length >= ids.length - MAX_STATEMENTS_IN_FLIGHT, 'ids that only waited were not consumed')
  const second = await consumeAll(a.store, ids)
  t.same(second, ids.map(() => false), 'and every id is consumed exactly once from here on')
})

t.test('a hung store holds a bounded queue: beyond it, refused at once', async t => {
  const { url } = await createTestDatabase(t)
  const a = instance(t, url)
  const release = await lockReplayStore(url)
  t.teardown(release)
  const extra = 25
  const all = Array.from({ length: MAX_WAITING_CONSUMES + MAX_STATEMENTS_IN_FLIGHT + extra }, async () => await outcome(a.store.consume(newId(), expiry())))
  t.equal(await settledWithin(all, 300), extra, 'the consumes over the bound are answered at once')
  const results = await Promise.all(all)
  t.ok(results.every(r => r === 'REPLAY_STORE_UNAVAILABLE'), 'every consume refused, none accepted')
})

t.test('close: waiting consumes are refused at once, statements in flight by their timeout', async t => {
  const { url } = await createTestDatabase(t)
  const a = instance(t, url)
  const release = await lockReplayStore(url)
  t.teardown(release)
  const all = Array.from({ length: 30 }, async () => await outcome(a.store.consume(newId(), expiry())))
  await new Promise(resolve => setTimeout(resolve, 50))
  a.store.close()
  t.equal(await settledWithin(all, 100), 30 - MAX_STATEMENTS_IN_FLIGHT, 'the waiting ones at once')
  const started = Date.now()
  const results = await Promise.all(all)
  t.ok(Date.now() - started < 2500, 'the rest within the timeout')
  t.ok(results.every(r => r === 'REPLAY_STORE_UNAVAILABLE'), 'all refused')
  t.equal(await outcome(a.store.consume(newId(), expiry())), 'REPLAY_STORE_UNAVAILABLE', 'a closed store accepts nothing')
})
