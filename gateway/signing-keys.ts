import type { KeyObject } from 'node:crypto'
import type { JWK } from 'jose'
import type { Sql } from 'postgres'
import { SIGNING_KEYS_CHANNEL, signingKeysRepository } from '../shared/db/signing-keys.js'
import type { SigningKeyRow } from '../shared/db/signing-keys.js'
import type { Config } from '../shared/config.js'
import { decryptPrivateKey, generateSigningKey, publicKeyOf, verificationGraceSeconds, verifiesUntil } from '../shared/keys.js'
import type { SigningAlg } from '../shared/keys.js'

export interface CurrentKey { readonly kid: string, readonly alg: SigningAlg, readonly privateKey: KeyObject }
export interface VerificationKey {
  readonly alg: SigningAlg
  readonly key: KeyObject
  readonly jwk: JWK
  // When this key stops verifying: its retirement plus the longest a token it signed can
  // live. Infinity for the current key.
  readonly verifiesUntil: number
}

// The gateway's view of the signing keys in Postgres: the current key signs, every key whose
// tokens may still be alive verifies. `ehrctl keys rotate` notifies, and every instance
// reloads; an unknown kid also triggers one reload, for a token signed by a key this
// instance has not heard of yet.
export class SigningKeys {
  readonly #sql: Sql
  readonly #repo: ReturnType<typeof signingKeysRepository>
  readonly #kek: Buffer
  readonly #tokens: Config['tokens']
  readonly #now: () => number
  readonly #onReloadError: (err: unknown) => void
  #retry: NodeJS.Timeout | undefined
  #retryDelayMs = 1000
  #current: CurrentKey | undefined
  #verifying = new Map<string, VerificationKey>()
  #lastReload = 0
  #reloading: Promise<void> | undefined
  #reloadAgain = false
  #unlisten: (() => Promise<void>) | undefined

  constructor (sql: Sql, options: { kek: Buffer, tokens: Config['tokens'], now: () => number, onReloadError: (err: unknown) => void }) {
    this.#sql = sql
    this.#repo = signingKeysRepository(sql)
    this.#kek = options.kek
    this.#tokens = options.tokens
    this.#now = options.now
    this.#onReloadError = options.onReloadError
  }

  // First start creates the first key; later starts load what is there.
  async start (): Promise<void> {
    await this.#repo.ensureCurrent(async () => await generateSigningKey(this.#tokens.alg, this.#kek))
    await this.reload()
    const { unlisten } = await this.#sql.listen(SIGNING_KEYS_CHANNEL, () => { this.#reloadInBackground() }, () => { this.#reloadInBackground() })
    this.#unlisten = unlisten
  }

  async close (): Promise<void> {
    clearTimeout(this.#retry)
    await this.#unlisten?.()
  }

  // A rotation this instance failed to load would leave it signing with a retired key:
  // say so and try again, backing off to 30 s, until it succeeds.
  #reloadInBackground (): void {
    clearTimeout(this.#retry)
    this.reload().then(() => { this.#retryDelayMs = 1000 }, err => {
      this.#onReloadError(err)
      this.#retry = setTimeout(() => { this.#reloadInBackground() }, this.#retryDelayMs).unref()
      this.#retryDelayMs = Math.min(this.#retryDelayMs * 2, 30_000)
    })
  }

  get ready (): boolean {
    return this.#current !== undefined
  }

  current (): CurrentKey {
    if (this.#current === undefined) throw new Error('signing keys not loaded: call start() first')
    return this.#current
  }

  // A reload asked for while one runs is run again afterwards: the running one may have read
  // the table before the change it is being told about committed.
  async reload (): Promise<void> {
    if (this.#reloading !== undefined) {
      this.#reloadAgain = true
      await this.#reloading
      return
    }
    this.#reloading = (async () => {
      try {
        do {
          this.#reloadAgain = false
          await this.#load()
        } while (this.#reloadAgain)
      } finally {
        this.#reloading = undefined
      }
    })()
    await this.#reloading
  }

  async #load (): Promise<void> {
    this.#lastReload = this.#now()
    const rows = await this.#repo.verifying(verificationGraceSeconds(this.#tokens))
    const verifying = new Map<string, VerificationKey>()
    let current: SigningKeyRow | undefined
    for (const row of rows) {
      verifying.set(row.kid, { alg: row.alg, key: publicKeyOf(row), jwk: row.publicJwk, verifiesUntil: verifiesUntil(row, this.#tokens) })
      if (row.retiredAt === null) current = row
    }
    if (current !== undefined) {
      this.#current = { kid: current.kid, alg: current.alg, privateKey: decryptPrivateKey(current, this.#kek) }
    }
    this.#verifying = verifying
  }

  // The key for a token's kid, reloading at most once a second for kids not seen yet, so a
  // flood of tokens with made-up kids cannot turn into a flood of queries.
  async verificationKey (kid: string): Promise<VerificationKey | undefined> {
    if (!this.#verifying.has(kid) && this.#now() - this.#lastReload >= 1000) await this.reload()
    return this.verifies(kid) ? this.#verifying.get(kid) : undefined
  }

  // Whether tokens signed by `kid` are still acceptable now. A retired key stops at the end
  // of its grace period by the clock, without waiting for the next reload.
  verifies (kid: string): boolean {
    const key = this.#verifying.get(kid)
    return key !== undefined && this.#now() < key.verifiesUntil
  }

  jwks (): { keys: JWK[] } {
    const now = this.#now()
    return { keys: [...this.#verifying.values()].filter(k => now < k.verifiesUntil).map(k => k.jwk) }
  }
}
