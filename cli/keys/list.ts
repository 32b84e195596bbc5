import { signingKeysRepository } from '../../shared/db/signing-keys.js'
import { configFor, withDatabase } from '../context.js'
import type { Context } from '../context.js'
import { formatTime } from '../output.js'
import type { Human } from '../output.js'
import type { Verb } from '../verb.js'
import { keyView } from './view.js'
import type { KeyView } from './view.js'

export type ListKeysInput = Record<string, never>

async function run (_input: ListKeysInput, ctx: Context): Promise<KeyView[]> {
  // TOKEN_TTL_SECONDS (default 300) decides how long a retired key keeps verifying.
  const config = configFor(ctx, ['database'])
  const rows = await withDatabase(ctx, config, { schema: 'current' }, async sql =>
    await signingKeysRepository(sql).list())
  const now = ctx.now()
  return rows.map(row => keyView(row, config.tokens, now))
}

function present (keys: KeyView[]): Human {
  return {
    table: {
      // current signs new tokens; retired only verifies the tokens it signed, until those
      // can no longer be alive; expired does nothing any more.
      columns: ['kid', 'alg', 'created', 'state', 'verifies tokens until'],
      rows: keys.map(k => [k.kid, k.alg, formatTime(k.createdAt), k.state, formatTime(k.verifiesUntil)]),
      empty: 'No signing keys yet: the gateway creates one on first start, or run `ehrctl keys rotate`.'
    }
  }
}

export const listKeysVerb: Verb<ListKeysInput, KeyView[]> = { run, present }
