import { generateKeyPairSync, randomBytes } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { inspect } from 'node:util'
import t from 'tap'
import { ConfigError, loadConfig, loadGatewayConfig } from '../../shared/config.js'
import type { Env } from '../../shared/config.js'

const SECRET = 'GOCSPX-' + randomBytes(8).toString('hex')
const REFRESH = '1//' + randomBytes(8).toString('hex')
const dir = t.testdir()
const pem = (key: ReturnType<typeof generateKeyPairSync>['privateKey']): string => key.export({ type: 'pkcs8', format: 'pem' }) as string
const rsa = pem(generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey)
const p384 = pem(generateKeyPairSync('ec', { namedCurve: 'P-384' }).privateKey)
const p256 = pem(generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey)
const file = (name: string, text: string): string => {
  const path = join(dir, name)
  writeFileSync(path, text)
  return path
}
const sa = (fields: Record<string, unknown>): string => JSON.stringify({ type: 'service_account', client_email: 'gw@p.iam.gserviceaccount.com', private_key: rsa, private_key_id: 'k1', ...fields })
const files = {
  sa: file('sa.json', sa({})),
  saNoEmail: file('sa-no-email.json', sa({ client_email: '' })),
  saEcKey: file('sa-ec.json', sa({ private_key: p256 })),
  user: file('user.json', JSON.stringify({ type: 'authorized_user', client_id: 'x', client_secret: 'y', refresh_token: 'z' })),
  notJson: file('not.json', 'hello'),
  rsa: file('rsa.key', rsa),
  p384: file('p384.key', p384),
  p256: file('p256.key', p256),
  cert: file('not-a-key.pem', '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n'),
  secret: file('client-secret', SECRET + '\n')
}

const base: Env = { EHR_UPSTREAM_URL: 'https://ehr.example/fhir', TLS_CERT_FILE: '/c', TLS_KEY_FILE: '/k', TLS_CLIENT_CA_FILE: '/ca', TOKEN_KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64') }
const oauth: Env = { GOOGLE_OAUTH_CLIENT_ID: 'id.apps.googleusercontent.com', GOOGLE_OAUTH_CLIENT_SECRET: SECRET, GOOGLE_OAUTH_REFRESH_TOKEN: REFRESH }
const smart: Env = { SMART_TOKEN_URL: 'https://fhir.epic.example/oauth2/token', SMART_CLIENT_ID: 'client-1', SMART_PRIVATE_KEY_FILE: files.p384 }

function problems (env: Env): Record<string, string> {
  try {
    loadConfig({ ...base, ...env })
  } catch (err) {
    if (err instanceof ConfigError) return Object.fromEntries(err.problems.map(p => [p.variable, p.message]))
    throw err
  }
  return {}
}

t.test('each mode settles into one token source', async t => {
  const o = loadGatewayConfig({ ...base, ...oauth, GOOGLE_QUOTA_PROJECT: 'billing-1', GOOGLE_TOKEN_URL: 'https://private.googleapis.com/token' }).upstream.tokenSource
  t.match(o, { mode: 'google-oauth', clientId: 'id.apps.googleusercontent.com', quotaProject: 'billing-1' })
  t.equal(o?.mode === 'google-oauth' && o.tokenUrl?.href, 'https://private.googleapis.com/token')
  const s = loadGatewayConfig({ ...base, GOOGLE_APPLICATION_CREDENTIALS: files.sa, GOOGLE_SCOPES: 'a b' }).upstream.tokenSource
  t.match(s, { mode: 'google-service-account', clientEmail: 'gw@p.iam.gserviceaccount.com', privateKeyId: 'k1', scopes: ['a', 'b'], tokenUrl: undefined })
  t.match(loadGatewayConfig({ ...base, GOOGLE_APPLICATION_CREDENTIALS: files.sa }).upstream.tokenSource, { scopes: ['https://www.googleapis.com/auth/cloud-healthcare'] })
  t.match(loadGatewayConfig({ ...base, ...smart }).upstream.tokenSource, { mode: 'smart', alg: 'ES384', clientId: 'client-1', keyId: undefined })
  t.match(loadGatewayConfig({ ...base, ...smart, SMART_PRIVATE_KEY_FILE: files.rsa }).upstream.tokenSource, { alg: 'RS384' })
  t.equal(loadGatewayConfig(base).upstream.tokenSource, undefined, 'none: API key (or nothing) only')
  const fromFile = loadGatewayConfig({ ...base, ...oauth, GOOGLE_OAUTH_CLIENT_SECRET: '', GOOGLE_OAUTH_CLIENT_SECRET_FILE: files.secret }).upstream.tokenSource
  t.equal(fromFile?.mode === 'google-oauth' && fromFile.clientSecret.reveal(), SECRET, 'GOOGLE_OAUTH_CLIENT_SECRET_FILE')
  t.equal(loadGatewayConfig({ ...base, ...oauth }).upstream.authTimeoutMs, 5000)
})

t.test('secrets and keys never print', async t => {
  for (const env of [oauth, { GOOGLE_APPLICATION_CREDENTIALS: files.sa }, smart]) {
    const config = loadGatewayConfig({ ...base, ...env })
    for (const shown of [JSON.stringify(config), inspect(config, { depth: 10 })]) {
      t.notMatch(shown, SECRET)
      t.notMatch(shown, REFRESH)
      t.notMatch(shown, 'PRIVATE KEY')
    }
  }
})

t.test('incomplete, conflicting or invalid settings name each variable', async t => {
  const cases: Array<[string, Env, Record<string, RegExp>]> = [
    ['incomplete OAuth set', { GOOGLE_OAUTH_CLIENT_ID: 'id' }, { GOOGLE_OAUTH_CLIENT_SECRET: /required/, GOOGLE_OAUTH_REFRESH_TOKEN: /required/ }],
    ['redirect URI alone', { GOOGLE_OAUTH_REDIRECT_URI: 'https://x/cb' }, { GOOGLE_OAUTH_CLIENT_ID: /required/, GOOGLE_OAUTH_CLIENT_SECRET: /required/, GOOGLE_OAUTH_REFRESH_TOKEN: /required/ }],
    ['two token sources', { ...oauth, ...smart }, { 'GOOGLE_OAUTH_*': /only one upstream token source/, 'SMART_*': /only one/ }],
    ['OAuth and a service account', { ...oauth, GOOGLE_APPLICATION_CREDENTIALS: files.sa }, { 'GOOGLE_OAUTH_*': /only one/, GOOGLE_APPLICATION_CREDENTIALS: /only one/ }],
    ['unreadable key file', { GOOGLE_APPLICATION_CREDENTIALS: join(dir, 'missing.json') }, { GOOGLE_APPLICATION_CREDENTIALS: /cannot read .*ENOENT/ }],
    ['key file not JSON', { GOOGLE_APPLICATION_CREDENTIALS: files.notJson }, { GOOGLE_APPLICATION_CREDENTIALS: /is not JSON/ }],
    ['user credentials file', { GOOGLE_APPLICATION_CREDENTIALS: files.user }, { GOOGLE_APPLICATION_CREDENTIALS: /not a service-account key/ }],
    ['key file without email', { GOOGLE_APPLICATION_CREDENTIALS: files.saNoEmail }, { GOOGLE_APPLICATION_CREDENTIALS: /no client_email/ }],
    ['key file with an EC key', { GOOGLE_APPLICATION_CREDENTIALS: files.saEcKey }, { GOOGLE_APPLICATION_CREDENTIALS: /no valid RSA private_key/ }],
    ['incomplete SMART set', { SMART_CLIENT_ID: 'c' }, { SMART_TOKEN_URL: /required/, SMART_PRIVATE_KEY_FILE: /required/ }],
    ['SMART alg mismatch', { ...smart, SMART_ALG: 'RS384' }, { SMART_ALG: /is RS384 but .* ES384/ }],
    ['SMART P-256 key', { ...smart, SMART_PRIVATE_KEY_FILE: files.p256 }, { SMART_PRIVATE_KEY_FILE: /EC P-384 \(ES384\) or RSA/ }],
    ['SMART key file not a key', { ...smart, SMART_PRIVATE_KEY_FILE: files.cert }, { SMART_PRIVATE_KEY_FILE: /not a PEM private key/ }],
    ['SMART key file missing', { ...smart, SMART_PRIVATE_KEY_FILE: join(dir, 'gone.key') }, { SMART_PRIVATE_KEY_FILE: /cannot read/ }],
    ['SMART unknown alg', { ...smart, SMART_ALG: 'HS256' }, { SMART_ALG: /allowed values/ }],
    ['SMART token URL not a URL', { ...smart, SMART_TOKEN_URL: 'token' }, { SMART_TOKEN_URL: /not a valid URL/ }],
    ['SMART token URL not http', { ...smart, SMART_TOKEN_URL: 'ftp://x/token' }, { SMART_TOKEN_URL: /https/ }],
    ['token URL with credentials', { ...smart, SMART_TOKEN_URL: 'https://u:p@x/token' }, { SMART_TOKEN_URL: /credentials/ }],
    ['plain http token URL in production', { ...oauth, NODE_ENV: 'production', DATABASE_URL: 'postgres://x/y', TOKEN_ISSUER: 'https://gw', GOOGLE_TOKEN_URL: 'http://10.0.0.5/token' }, { GOOGLE_TOKEN_URL: /https:\/\/ in production/ }],
    ['Google settings without a Google source', { ...smart, GOOGLE_QUOTA_PROJECT: 'p', GOOGLE_TOKEN_URL: 'https://x/token' }, { GOOGLE_QUOTA_PROJECT: /only with GOOGLE_/, GOOGLE_TOKEN_URL: /only with GOOGLE_/ }],
    ['scopes with a refresh token', { ...oauth, GOOGLE_SCOPES: 'x' }, { GOOGLE_SCOPES: /only to a service account/ }],
    ['quota project not header-safe', { ...oauth, GOOGLE_QUOTA_PROJECT: 'a\nb' }, { GOOGLE_QUOTA_PROJECT: /pattern/ }]
  ]
  for (const [label, env, expected] of cases) {
    const found = problems(env)
    t.same(Object.keys(found).sort(), Object.keys(expected).sort(), label)
    for (const [variable, message] of Object.entries(expected)) t.match(found[variable], message, `${label}: ${variable}`)
    t.notMatch(JSON.stringify(found), SECRET, `${label}: no secret in the problems`)
  }
  t.same(problems({ ...oauth, NODE_ENV: 'production', DATABASE_URL: 'postgres://x/y', TOKEN_ISSUER: 'https://gw', GOOGLE_TOKEN_URL: 'http://localhost:8080/token' }), {}, 'plain http to localhost is fine')
})
