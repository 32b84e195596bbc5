import type { Sql } from 'postgres'
import { replayRepository } from '../shared/db/replay.js'
import type { ReplayRepository } from '../shared/db/replay.js'
import { GatewayError } from '../shared/errors.js'

const CLEANUP_INTERVAL_MS = 60_000
// A store that hangs (not down, just not answering) must not hold requests for the pool's
// connect timeout: past this, the request is refused as if the store were down.
const CONSUME_TIMEOUT_MS = 2000

// The gateway's side of the shared replay store: consume fails closed (a store we cannot
// ask is a replay we cannot rule out), and expired entries are deleted on a timer that
// never holds up a request or the process.
export class ReplayStore {
  readonly #repo: ReplayRepository
  readonly #now: () => number
  readonly #onCleanupError: (err: unknown) => void
  #timer: NodeJS.Timeout | undefined
  #cleaning = false

  constructor (sql: Sql, options: { now: () => number, onCleanupError: (err: unknown) => void }) {
    this.#repo = replayRepository(sql)
    this.#now = options.now
    this.#onCleanupError = options.onCleanupError
  }

  // true: first use. `id` is namespaced by the caller ('dpop:<jkt>:<jti>', 'token:<jti>').
  async consume (id: string, expiresAtMs: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => { reject(new Error(`replay store did not answer within ${CONSUME_TIMEOUT_MS} ms`)) }, CONSUME_TIMEOUT_MS)
    })
    try {
      return await Promise.race([this.#repo.consume(id, new Date(expiresAtMs)), timeout])
    } catch (err) {
      throw new GatewayError('REPLAY_STORE_UNAVAILABLE', [], { cause: err })
    } finally {
      clearTimeout(timer)
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

  close (): void {
    clearInterval(this.#timer)
  }
}
