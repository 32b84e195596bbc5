import type { Config } from '../../shared/config.js'
import type { SigningKeyRow } from '../../shared/db/signing-keys.js'
import { verifiesUntil } from '../../shared/keys.js'

// Never the row itself: it carries the encrypted private key, which no output should.
export interface KeyView {
  readonly kid: string
  readonly alg: string
  readonly state: 'current' | 'retired' | 'expired'
  readonly createdAt: Date
  readonly retiredAt: Date | null
  // A retired key still verifies the tokens it signed until they can no longer be alive.
  readonly verifiesUntil: Date | null
}

export function keyView (row: SigningKeyRow, tokens: Config['tokens'], now: Date): KeyView {
  const until = verifiesUntil(row, tokens)
  const state = until === Infinity ? 'current' : until > now.getTime() ? 'retired' : 'expired'
  return { kid: row.kid, alg: row.alg, state, createdAt: row.createdAt, retiredAt: row.retiredAt, verifiesUntil: until === Infinity ? null : new Date(until) }
}
