import { createRequire } from 'node:module'
import type { FastifyRateLimitStore, FastifyRateLimitStoreCtor } from '@fastify/rate-limit'
import type { FastifyBaseLogger } from 'fastify'
import { Redis } from 'ioredis'
import type { Secret } from '../shared/secret.js'
import { Lru } from './lru.js'
import type { Metrics } from './metrics.js'

type Incr = FastifyRateLimitStore['incr']
type Callback = Parameters<Incr>[1]

// @fastify/rate-limit's own Redis store (an atomic INCR + PEXPIRE script); the package
// exports only the plugin, so the store comes by path.
const RedisStore = createRequire(import.meta.url)('@fastify/rate-limit/store/RedisStore.js') as
  new (continueExceeding: boolean, exponentialBackoff: boolean, redis: Redis, key?: string) => FastifyRateLimitStore

export interface SharedLimitsOptions {
  readonly url: Secret
  readonly now: () => number
  readonly log: FastifyBaseLogger
  readonly metrics: Metrics
}

// Per-machine counters in Redis, so N gateways enforce one limit. A rate limit protects, it
// does not authenticate: when Redis is unreachable each instance counts for itself (under
// RATE_LIMIT_FALLBACK_MAX) instead of refusing EHR traffic, says so once per outage, and
// goes back to the shared counters as soon as Redis answers again.
export class SharedLimits {
  readonly redis: Redis
  readonly #store: FastifyRateLimitStore
  readonly #now: () => number
  readonly #log: FastifyBaseLogger
  readonly #metrics: Metrics
  // Fixed windows like the plugin's LocalStore, for the outage only.
  readonly #local = new Lru<string, { current: number, start: number }>(10_000)
  #up = false
  #outage = false
  #probe: NodeJS.Timeout | undefined
  #closed = false

  constructor (options: SharedLimitsOptions) {
    this.#now = options.now
    this.#log = options.log
    this.#metrics = options.metrics
    this.redis = new Redis(options.url.reveal(), {
      // A request must never wait on a dead Redis: no queueing while disconnected, no
      // retries of a command, and a short deadline for one that was sent.
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      connectTimeout: 2000,
      commandTimeout: 250,
      retryStrategy: times => Math.min(times * 200, 2000)
    })
    this.#store = new RedisStore(false, false, this.redis, 'ehr-gateway:rate-limit:')
    this.redis.on('ready', () => { this.#markUp() })
    this.redis.on('error', (err: Error) => { this.#markDown(err) })
    this.redis.on('close', () => { this.#markDown(new Error('connection closed')) })
    this.#metrics.rateLimitRedisUp.set(0)
  }

  // Whether the shared counters decide; the plugin asks before each count, for its `max`.
  get shared (): boolean {
    return this.#up
  }

  // The plugin instantiates its store itself (`new Store(options)`).
  storeClass (): FastifyRateLimitStoreCtor {
    const limits = this
    return class FallbackStore implements FastifyRateLimitStore {
      incr (key: string, callback: Callback, timeWindow: number, max: number): void {
        limits.#incr(key, callback, timeWindow, max)
      }

      child (): FastifyRateLimitStore {
        return this
      }
    }
  }

  #incr (key: string, callback: Callback, timeWindow: number, max: number): void {
    if (!this.#up) {
      callback(null, this.#localIncr(key, timeWindow))
      return
    }
    this.#store.incr(key, (err, result) => {
      if (err === null && result !== undefined) {
        callback(null, result)
        return
      }
      this.#markDown(err ?? new Error('no result'))
      callback(null, this.#localIncr(key, timeWindow))
    }, timeWindow, max)
  }

  #localIncr (key: string, timeWindow: number): { current: number, ttl: number } {
    this.#metrics.rateLimitFallback.inc()
    const now = this.#now()
    let entry = this.#local.get(key)
    if (entry === undefined || entry.start + timeWindow <= now) entry = { current: 0, start: now }
    entry.current++
    this.#local.set(key, entry)
    return { current: entry.current, ttl: entry.start + timeWindow - now }
  }

  #markUp (): void {
    if (this.#up) return
    this.#up = true
    clearInterval(this.#probe)
    this.#probe = undefined
    this.#metrics.rateLimitRedisUp.set(1)
    if (this.#outage) this.#log.info('Redis answers again: rate limits are shared across instances again')
    else this.#log.info('rate limits are shared across instances through Redis')
    this.#outage = false
  }

  #markDown (err: Error): void {
    if (this.#closed) return
    this.#up = false
    this.#metrics.rateLimitRedisUp.set(0)
    if (!this.#outage) {
      this.#outage = true
      // ioredis' messages name host and port, never the password.
      this.#log.warn({ reason: err.message }, 'Redis unreachable: each instance enforces RATE_LIMIT_FALLBACK_MAX by itself until it answers')
    }
    // A connection that stays open but stopped answering never emits `ready` again; ask it.
    this.#probe ??= setInterval(() => {
      if (this.redis.status === 'ready') this.redis.ping().then(() => { this.#markUp() }, () => {})
    }, 1000).unref()
  }

  async close (): Promise<void> {
    this.#closed = true
    this.#up = false
    clearInterval(this.#probe)
    this.#probe = undefined
    if (this.redis.status === 'ready') {
      try {
        await this.redis.quit()
        return
      } catch {}
    }
    this.redis.disconnect()
  }
}
