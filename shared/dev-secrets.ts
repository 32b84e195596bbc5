import { randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'

// Development only (loadConfig never calls this when NODE_ENV=production): a
// TOKEN_KEY_ENCRYPTION_KEY kept in the data directory beside the embedded Postgres, so the
// gateway and ehrctl on one dev machine agree without anyone inventing a key by hand.
export function devKeyEncryptionKey (dataDir = '.data'): () => string {
  return () => {
    const dir = resolve(dataDir)
    const file = join(dir, 'token-kek')
    if (existsSync(file)) return readFileSync(file, 'utf8').trim()
    mkdirSync(dir, { recursive: true })
    const key = randomBytes(32).toString('base64')
    writeFileSync(file, key + '\n', { mode: 0o600, flag: 'wx' })
    return key
  }
}
