import type { Sql } from 'postgres'
import { MAX_REPLAY_BATCH, replayRepository, storableReplayId } from '../shared/db/replay.js'
import type { ReplayEntry, ReplayRepository } from '../shared/db/replay.js'
import { GatewayError } from '../shared/errors.js'

const CLEANUP_INTERVAL_MS = 60_000
// A store that hangs (not down, just not answering) must not hold requests for the pool's
// connect timeout: past this, the request is refused as if the store were down. Counted
// from the call, so time spent queued behind a slow statement counts too.
const CONSUME_TIMEOUT_MS = 2000
// Statements in flight at once. One would already batch everything that arrives during a
// round trip; a second overlaps the next batch's send and commit with the first's, which
// Postgres can then flush to the WAL together. More buys little (the batches just get
// smaller) and takes pooled connections the registry, keys and audit trail need.
export const MAX_STATEMENTS_IN_FLIGHT = 2
// Consumes waiting for a statement. A statement that hangs keeps its slot until it ends
// (it is not cancelled: postgres.js' query.cancel() drops the promise of its cancel
// request, so a store that cannot be reached would become an unhandled rejection), which
// keeps the store's share of the pool bounded; this bounds memory. Over the timeout it is
// 5,000 consumes a second, more than one instance serves. Beyond it, refused at once.
export const MAX_WAITING_CONSUMES = 10_000

interface Waiter extends ReplayEntry {
  readonly resolve: (fresh: boolean) => void
  readonly reject: (err: GatewayError) => void
  readonly timer: NodeJS.Timeout
}

const unavailable = (reason: string, cause?: unknown): GatewayError =>
  new GatewayError('REPLAY_STORE_UNAVAILABLE', [], { cause: cause ?? new Error(reason) })

// The gateway's side of the shared replay store: consume fails closed (a store we cannot
// ask is a replay we cannot rule out), and expired entries are deleted on a timer that
// never holds up a request or the process.
//
// Group commit without added delay: a consume is sent at once when fewer than
// MAX_STATEMENTS_IN_FLIGHT statements are in flight, else it waits and goes with every
// other waiting consume in one statement as soon as one returns.
export class ReplayStore {
  readonly #repo: ReplayRepository
  readonly #now: () => number
  readonly #onCleanupError: (err: unknown) => void
  // Insertion-ordered; a consume that times out while waiting leaves it at once.
  readonly #waiting = new Set<Waiter>()
  #inFlight = 0
  #closed = false
  #timer: NodeJS.Timeout | undefined
  #cleaning = false

  constructor (sql: Sql, options: { now: () => number, onCleanupError: (err: unknown) => void }) {
    this.#repo = replayRepository(sql)
    this.#now = options.now
    this.#onCleanupError = options.onCleanupError
  }

  // true: first use. `id` is namespaced by the caller ('dpop:<jkt>:<jti>', 'token:<jti>').
  async consume (id: string, expiresAtMs: number): Promise<boolean> {
    if (this.#closed) throw unavailable('replay store closed')
    if (!storableReplayId(id)) throw unavailable('identifier cannot be stored (too long, NUL or lone surrogate)')
    if (this.#waiting.size >= MAX_WAITING_CONSUMES) throw unavailable(`${MAX_WAITING_CONSUMES} consumes already waiting for the replay store`)
    return await new Promise<boolean>((resolve, reject) => {
      const waiter: Waiter = {
        id,
        expiresAt: new Date(expiresAtMs),
        resolve,
        reject,
        timer: setTimeout(() => {
          this.#waiting.delete(waiter)
          reject(unavailable(`replay store did not answer within ${CONSUME_TIMEOUT_MS} ms`))
        }, CONSUME_TIMEOUT_MS).unref()
      }
      this.#waiting.add(waiter)
      this.#send()
    })
  }

  #send (): void {
    while (this.#inFlight < MAX_STATEMENTS_IN_FLIGHT && this.#waiting.size > 0) {
      const batch: Waiter[] = []
      for (const waiter of this.#waiting) {
        this.#waiting.delete(waiter)
        batch.push(waiter)
        if (batch.length === MAX_REPLAY_BATCH) break
      }
      this.#inFlight++
      void this.#run(batch)
    }
  }

  async #run (batch: readonly Waiter[]): Promise<void> {
    // The first consume of an id in a batch is the one that may be fresh; the statement
    // would return a repeated id once, which must not read as two first uses.
    const first = new Map<string, Waiter>()
    for (const waiter of batch) if (!first.has(waiter.id)) first.set(waiter.id, waiter)
    try {
      const fresh = await this.#repo.consumeBatch([...first.values()])
      // A waiter that timed out was refused already; settling it again does nothing.
      for (const waiter of batch) {
        clearTimeout(waiter.timer)
        waiter.resolve(fresh.has(waiter.id) && first.get(waiter.id) === waiter)
      }
    } catch (err) {
      // Rolled back: none of these ids was consumed.
      for (const waiter of batch) {
        clearTimeout(waiter.timer)
        waiter.reject(unavailable('replay store statement failed', err))
      }
    } finally {
      this.#inFlight--
      if (!this.#closed) this.#send()
    }
  }

  startCleanup (): void {
    this.#timer = setInterval(() => { void this.cleanup() }, CLEANUP_INTERVAL_MS).unref()
  }

  // One at a time: a slow delete is not stacked up behind by the next tick.
  async cleanup (): Promise<number> {
    if (this.#cleaning) return 0
    this.#cleaning = true
    try {
      return await this.#repo.purgeExpired(new Date(this.#now()))
    } catch (err) {
      this.#onCleanupError(err)
      return 0
    } finally {
      this.#cleaning = false
    }
  }

  // Waiting consumes are refused now; statements in flight settle their own (by their
  // answer or their timeout, whose timers never hold the process).
  close (): void {
    this.#closed = true
    clearInterval(this.#timer)
    for (const waiter of this.#waiting) {
      clearTimeout(waiter.timer)
      waiter.reject(unavailable('replay store closed'))
    }
    this.#waiting.clear()
  }
}
