import type { Sql } from 'postgres'
import { MACHINE_CHANNEL, machinesRepository } from '../shared/db/machines.js'
import type { Machine } from '../shared/db/machines.js'
import { GatewayError } from '../shared/errors.js'
import { Lru } from './lru.js'

interface Entry { readonly machine: Machine | null, readonly expires: number }

export interface RegistryStats { hits: number, misses: number }

// Certificate fingerprint → machine, consulted on every request (keep-alive connections
// and issued tokens outlive a revocation). Postgres NOTIFY evicts an entry the moment an
// admin changes it, on every instance; the TTL only bounds staleness if a notification is
// ever lost, and a (re)connected LISTEN drops everything it may have missed.
export class MachineRegistry {
  readonly #repo: ReturnType<typeof machinesRepository>
  readonly #sql: Sql
  readonly #ttlMs: number
  readonly #now: () => number
  readonly #cache = new Lru<string, Entry>(50_000)
  readonly #inflight = new Map<string, { readonly generation: number, readonly promise: Promise<Machine | null> }>()
  // Bumped by every invalidation, so a lookup that started before a revocation committed
  // cannot put its stale answer back in the cache.
  #generation = 0
  #unlisten: (() => Promise<void>) | undefined
  readonly stats: RegistryStats = { hits: 0, misses: 0 }

  constructor (sql: Sql, options: { ttlMs: number, now: () => number }) {
    this.#sql = sql
    this.#repo = machinesRepository(sql)
    this.#ttlMs = options.ttlMs
    this.#now = options.now
  }

  async listen (): Promise<void> {
    const { unlisten } = await this.#sql.listen(MACHINE_CHANNEL, fingerprint => {
      this.#generation++
      this.#cache.delete(fingerprint)
    }, () => {
      this.#generation++
      this.#cache.clear()
    })
    this.#unlisten = unlisten
  }

  async close (): Promise<void> {
    await this.#unlisten?.()
    this.#unlisten = undefined
  }

  async lookup (fingerprint: string): Promise<Machine | null> {
    const cached = this.#cache.get(fingerprint)
    if (cached !== undefined && cached.expires > this.#now()) {
      this.stats.hits++
      return cached.machine
    }
    this.stats.misses++
    // Join a lookup already under way only if no change was announced since it started:
    // one begun before a revocation committed may still read the machine as active.
    const pending = this.#inflight.get(fingerprint)
    if (pending !== undefined && pending.generation === this.#generation) return await pending.promise
    const generation = this.#generation
    const promise = this.#load(fingerprint, generation)
    this.#inflight.set(fingerprint, { generation, promise })
    return await promise
  }

  async #load (fingerprint: string, generation: number): Promise<Machine | null> {
    try {
      const machine = (await this.#repo.findByFingerprint(fingerprint)) ?? null
      if (generation === this.#generation) {
        this.#cache.set(fingerprint, { machine, expires: this.#now() + this.#ttlMs })
      }
      return machine
    } catch (err) {
      // Fail closed: no database, no admission.
      throw new GatewayError('DB_UNREACHABLE', ['machine registry lookup failed'], { cause: err })
    } finally {
      if (this.#inflight.get(fingerprint)?.generation === generation) this.#inflight.delete(fingerprint)
    }
  }
}
