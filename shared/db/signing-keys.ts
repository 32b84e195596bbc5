import type { Sql } from 'postgres'
import type { JWK } from 'jose'

export interface SigningKeyRow {
  readonly kid: string
  readonly alg: 'EdDSA' | 'ES256'
  readonly publicJwk: JWK
  readonly privateKeyEncrypted: Buffer
  readonly createdAt: Date
  readonly retiredAt: Date | null
}

export const SIGNING_KEYS_CHANNEL = 'ehr_signing_keys_changed'

// Any fixed number; serialises changes of the current key (first start, rotations) across
// gateway instances and admins.
const CURRENT_KEY_LOCK = 7_204_512_114

export function signingKeysRepository (sql: Sql) {
  async function list (): Promise<SigningKeyRow[]> {
    return await sql<SigningKeyRow[]>`select * from signing_keys order by created_at desc`
  }

  // Keys whose tokens can still be alive: the current one, and any retired less than
  // `graceSeconds` ago (the longest a token it signed can still be valid).
  async function verifying (graceSeconds: number): Promise<SigningKeyRow[]> {
    return await sql<SigningKeyRow[]>`
      select * from signing_keys
      where retired_at is null or retired_at > now() - make_interval(secs => ${graceSeconds})
      order by created_at desc`
  }

  // Makes `key` the current key; the previous current key is retired in the same
  // transaction, so there is always exactly one.
  async function rotateTo (key: Omit<SigningKeyRow, 'createdAt' | 'retiredAt'>): Promise<SigningKeyRow> {
    return await sql.begin(async tx => {
      await tx`select pg_advisory_xact_lock(${CURRENT_KEY_LOCK})`
      await tx`update signing_keys set retired_at = now() where retired_at is null`
      const [row] = await tx<SigningKeyRow[]>`insert into signing_keys ${tx(key as unknown as Record<string, unknown>, 'kid', 'alg', 'publicJwk', 'privateKeyEncrypted')} returning *`
      return row as SigningKeyRow
    })
  }

  // First start: exactly one instance creates the key, the others see it.
  async function ensureCurrent (create: () => Promise<Omit<SigningKeyRow, 'createdAt' | 'retiredAt'>>): Promise<SigningKeyRow> {
    return await sql.begin(async tx => {
      await tx`select pg_advisory_xact_lock(${CURRENT_KEY_LOCK})`
      const [current] = await tx<SigningKeyRow[]>`select * from signing_keys where retired_at is null`
      if (current !== undefined) return current
      const key = await create()
      const [row] = await tx<SigningKeyRow[]>`insert into signing_keys ${tx(key as unknown as Record<string, unknown>, 'kid', 'alg', 'publicJwk', 'privateKeyEncrypted')} returning *`
      return row as SigningKeyRow
    })
  }

  return { list, verifying, rotateTo, ensureCurrent }
}

export type SigningKeysRepository = ReturnType<typeof signingKeysRepository>
