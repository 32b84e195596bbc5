import { keyEncryptionKeyBytes } from '../../shared/config.js'
import { signingKeysRepository } from '../../shared/db/signing-keys.js'
import { decryptPrivateKey, generateSigningKey } from '../../shared/keys.js'
import { configFor, required, withDatabase } from '../context.js'
import type { Context } from '../context.js'
import { formatTime } from '../output.js'
import type { Human } from '../output.js'
import type { Verb } from '../verb.js'
import { keyView } from './view.js'
import type { KeyView } from './view.js'

export type RotateKeysInput = Record<string, never>

export interface RotateKeysOutput {
  readonly current: KeyView
  readonly previous: KeyView | null
}

async function run (_input: RotateKeysInput, ctx: Context): Promise<RotateKeysOutput> {
  const config = configFor(ctx, ['database', 'tokenKeys'])
  const kek = keyEncryptionKeyBytes(required(config.tokens.keyEncryptionKey, 'TOKEN_KEY_ENCRYPTION_KEY'))
  return await withDatabase(ctx, config, { schema: 'current' }, async sql => {
    const keys = signingKeysRepository(sql)
    const before = (await keys.list()).find(k => k.retiredAt === null)
    // A key sealed under another TOKEN_KEY_ENCRYPTION_KEY than the gateways' would stop
    // every gateway from signing; the current key proves we hold the same one.
    if (before !== undefined) decryptPrivateKey(before, kek)
    const created = await keys.rotateTo(await generateSigningKey(config.tokens.alg, kek))
    const now = ctx.now()
    const previous = before === undefined ? undefined : (await keys.list()).find(k => k.kid === before.kid)
    return {
      current: keyView(created, config.tokens, now),
      previous: previous === undefined ? null : keyView(previous, config.tokens, now)
    }
  })
}

function present (out: RotateKeysOutput): Human {
  const notes = [`New current signing key ${out.current.kid} (${out.current.alg}); running gateways sign with it within a second.`]
  if (out.previous !== null) {
    notes.push(`Retired ${out.previous.kid}; it verifies tokens until ${formatTime(out.previous.verifiesUntil)}.`)
  }
  return { notes }
}

export const rotateKeysVerb: Verb<RotateKeysInput, RotateKeysOutput> = { run, present }
