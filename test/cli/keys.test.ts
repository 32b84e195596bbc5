import t from 'tap'
import { randomBytes } from 'node:crypto'
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import type { SigningKeyRow } from '../../shared/db/signing-keys.js'
import { decryptPrivateKey } from '../../shared/keys.js'
import { createTestDatabase } from '../helpers/db.js'
import { ehrctl, parseJson } from './harness.js'
import type { JsonError } from './harness.js'

interface KeyJson {
  kid: string
  alg: string
  state: 'current' | 'retired' | 'expired'
  createdAt: string
  retiredAt: string | null
  verifiesUntil: string | null
}
interface RotateJson { current: KeyJson, previous: KeyJson | null }

const kek = randomBytes(32)
const db = await createTestDatabase(t)
const env = { DATABASE_URL: db.url, TOKEN_KEY_ENCRYPTION_KEY: kek.toString('base64') }
const cwd = t.testdir()

const rows = async (): Promise<SigningKeyRow[]> => await db.sql<SigningKeyRow[]>`select * from signing_keys order by created_at`

t.test('keys list before any key exists', async t => {
  const tty = await ehrctl(['keys', 'list'], { env, cwd, tty: true })
  t.equal(tty.code, 0, tty.stderr)
  t.match(tty.stdout, /^No signing keys yet.*ehrctl keys rotate/)
  t.equal((await ehrctl(['keys', 'list'], { env, cwd })).stdout, '')
  t.same(parseJson<KeyJson[]>(await ehrctl(['keys', 'list', '--json'], { env, cwd })), [])
})

t.test('the first rotation creates the current key', async t => {
  const r = await ehrctl(['keys', 'rotate'], { env, cwd })
  t.equal(r.code, 0, r.stderr)
  const [row] = await rows()
  t.ok(row)
  if (row === undefined) return
  t.equal(r.stdout, `New current signing key ${row.kid} (EdDSA); running gateways sign with it within a second.\n`)
  t.equal(decryptPrivateKey(row, kek).asymmetricKeyType, 'ed25519', 'sealed under TOKEN_KEY_ENCRYPTION_KEY')
})

t.test('rotating twice more leaves one current key and retired ones', async t => {
  const second = await ehrctl(['keys', 'rotate'], { env, cwd })
  t.equal(second.code, 0, second.stderr)
  t.match(second.stdout, /^Retired \S+; it verifies tokens until \d{4}-[\d-]+T[\d:]+Z\.$/m)

  const third = await ehrctl(['keys', 'rotate', '--json'], { env: { ...env, TOKEN_ALG: 'ES256' }, cwd })
  t.equal(third.code, 0, third.stderr)
  const rotated = parseJson<RotateJson>(third)
  t.match(rotated, { current: { alg: 'ES256', state: 'current', retiredAt: null, verifiesUntil: null }, previous: { state: 'retired' } })

  const all = await rows()
  t.equal(all.length, 3)
  t.equal(all.filter(k => k.retiredAt === null).length, 1, 'exactly one current key')
  t.equal(all.at(-1)?.kid, rotated.current.kid)
  t.equal(all[1]?.kid, rotated.previous?.kid)

  const list = parseJson<KeyJson[]>(await ehrctl(['keys', 'list', '--json'], { env, cwd }))
  t.same(list.map(k => k.state).sort(), ['current', 'retired', 'retired'])
  for (const k of list) {
    t.notOk('privateKeyEncrypted' in k, 'no key material in the output')
    if (k.retiredAt === null) continue
    // Defaults: a retired key verifies for the 300 s its last token may live, plus the 5 s
    // clock tolerance the gateway grants.
    t.equal(Date.parse(k.verifiesUntil ?? '') - Date.parse(k.retiredAt), 305_000)
  }

  const tty = await ehrctl(['keys', 'list'], { env, cwd, tty: true })
  const [header, ...lines] = tty.stdout.trimEnd().split('\n')
  t.match(header, /^KID +ALG +CREATED +STATE +VERIFIES TOKENS UNTIL$/)
  t.equal(lines.length, 3)
  t.match(lines.filter(l => / current /.test(l)), [new RegExp(`^${rotated.current.kid} +ES256 +\\S+ +current +-$`)])
  t.equal(lines.filter(l => / retired +\d{4}-/.test(l)).length, 2)
  t.notMatch(tty.stdout, kek.toString('base64'))
})

t.test('TOKEN_TTL_SECONDS and the clock decide when a retired key has expired', async t => {
  const short = parseJson<KeyJson[]>(await ehrctl(['keys', 'list', '--json'], { env: { ...env, TOKEN_TTL_SECONDS: '10', TOKEN_CLOCK_TOLERANCE_SECONDS: '0' }, cwd }))
  for (const k of short.filter(k => k.retiredAt !== null)) {
    t.equal(Date.parse(k.verifiesUntil ?? '') - Date.parse(k.retiredAt ?? ''), 10_000)
  }
  const inAnHour = () => new Date(Date.now() + 3_600_000)
  const later = parseJson<KeyJson[]>(await ehrctl(['keys', 'list', '--json'], { env, cwd, now: inAnHour }))
  t.same(later.map(k => k.state).sort(), ['current', 'expired', 'expired'])
  const piped = await ehrctl(['keys', 'list'], { env, cwd, now: inAnHour })
  t.equal(piped.stdout.trimEnd().split('\n').filter(l => l.split('\t')[3] === 'expired').length, 2)
})

t.test('keys rotate refuses a key-encryption key the current key was not sealed with', async t => {
  const before = await rows()
  const r = await ehrctl(['keys', 'rotate'], { env: { ...env, TOKEN_KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64') }, cwd })
  t.equal(r.code, 1)
  t.match(r.stderr, /^ehrctl: signing key '\S+' does not decrypt with TOKEN_KEY_ENCRYPTION_KEY\n$/)
  t.equal((await rows()).length, before.length, 'no key added')
})

t.test('keys rotate needs a valid key-encryption key outside development', async t => {
  const missing = await ehrctl(['keys', 'rotate', '--json'], { env: { DATABASE_URL: db.url, NODE_ENV: 'production' }, cwd })
  t.equal(missing.code, 1)
  t.match(parseJson<JsonError>(missing), { error: { code: 'CONFIG_INVALID', problems: [{ variable: 'TOKEN_KEY_ENCRYPTION_KEY', message: /is required/ }] } })
  const bad = await ehrctl(['keys', 'rotate'], { env: { ...env, TOKEN_KEY_ENCRYPTION_KEY: 'c2hvcnQ=' }, cwd })
  t.equal(bad.code, 1)
  t.equal(bad.stderr, 'ehrctl: invalid environment:\n  TOKEN_KEY_ENCRYPTION_KEY: must be 32 random bytes in base64 (openssl rand -base64 32)\n')
  t.notMatch(bad.stderr + bad.stdout, 'c2hvcnQ=')
})

t.test('in development keys rotate uses the key kept in ./.data, as the dev gateway does', async t => {
  const dev = await createTestDatabase(t)
  const dir = t.testdir()
  const first = await ehrctl(['keys', 'rotate'], { env: { DATABASE_URL: dev.url }, cwd: dir })
  t.equal(first.code, 0, first.stderr)
  const file = join(dir, '.data', 'token-kek')
  t.ok(existsSync(file))
  const second = await ehrctl(['keys', 'rotate'], { env: { DATABASE_URL: dev.url }, cwd: dir })
  t.equal(second.code, 0, second.stderr)
  const [row] = await dev.sql<SigningKeyRow[]>`select * from signing_keys where retired_at is null`
  if (row === undefined) return t.fail('no current key')
  t.ok(decryptPrivateKey(row, Buffer.from(readFileSync(file, 'utf8').trim(), 'base64')))
})
