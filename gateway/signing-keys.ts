import type { KeyObject } from 'node:crypto'
import type { JWK } from 'jose'
import type { Sql } from 'postgres'
import { SIGNING_KEYS_CHANNEL, signingKeysRepository } from '../shared/db/signing-keys.js'
import type { SigningKeyRow } from '../shared/db/signing-keys.js'
import { decryptPrivateKey, generateSigningKey, publicKeyOf } from '../shared/keys.js'
import type { SigningAlg } from '../shared/keys.js'

export interface CurrentKey { readonly kid: string, readonly alg: SigningAlg, readonly privateKey: KeyObject }
export interface VerificationKey { readonly alg: SigningAlg, readonly key: KeyObject, readonly jwk: JWK }

// The gateway's view of the signing keys in Postgres: the current key signs, every key whose
// tokens may still be alive verifies. `ehrctl keys rotate` notifies, and every instance
// reloads; an unknown kid also triggers one reload, for a token signed by a key this
// instance has not heard of yet.
export class SigningKeys {
  readonly #sql: Sql
  readonly #repo: ReturnType<typeof signingKeysRepository>
  readonly #kek: Buffer
  readonly #alg: SigningAlg
  readonly #graceSeconds: number
  readonly #now: () => number
  #current: CurrentKey | undefined
  #verifying = new Map<string, VerificationKey>()
  #lastReload = 0
  #reloading: Promise<void> | undefined
  #unlisten: (() => Promise<void>) | undefined

  constructor (sql: Sql, options: { kek: Buffer, alg: SigningAlg, graceSeconds: number, now: () => number }) {
    this.#sql = sql
    this.#repo = signingKeysRepository(sql)
    this.#kek = options.kek
    this.#alg = options.alg
    this.#graceSeconds = options.graceSeconds
    this.#now = options.now
  }

  // First start creates the first key; later starts load what is there.
  async start (): Promise<void> {
    await this.#repo.ensureCurrent(async () => await generateSigningKey(this.#alg, this.#kek))
    await this.reload()
    const { unlisten } = await this.#sql.listen(SIGNING_KEYS_CHANNEL, () => { void this.reload().catch(() => {}) }, () => { void this.reload().catch(() => {}) })
    this.#unlisten = unlisten
  }

  async close (): Promise<void> {
    await this.#unlisten?.()
  }

  get ready (): boolean {
    return this.#current !== undefined
  }

  current (): CurrentKey {
    if (this.#current === undefined) throw new Error('signing keys not loaded: call start() first')
    return this.#current
  }

  async reload (): Promise<void> {
    this.#reloading ??= this.#load().finally(() => { this.#reloading = undefined })
    await this.#reloading
  }

  async #load (): Promise<void> {
    this.#lastReload = this.#now()
    const rows = await this.#repo.verifying(this.#graceSeconds)
    const verifying = new Map<string, VerificationKey>()
    let current: SigningKeyRow | undefined
    for (const row of rows) {
      verifying.set(row.kid, { alg: row.alg, key: publicKeyOf(row), jwk: row.publicJwk })
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
    const known = this.#verifying.get(kid)
    if (known !== undefined) return known
    if (this.#now() - this.#lastReload < 1000) return undefined
    await this.reload()
    return this.#verifying.get(kid)
  }

  jwks (): { keys: JWK[] } {
    return { keys: [...this.#verifying.values()].map(k => k.jwk) }
  }
}
