import t from 'tap'
import { generateKeyPairSync, randomBytes } from 'node:crypto'
import { createDevCa } from '../../gateway/demo/pki.js'
import { startTokenServer } from '../helpers/token-server.js'
import { ehrctl, parseJson, writeFiles } from './harness.js'
import type { JsonError } from './harness.js'

const CLIENT_SECRET = 'GOCSPX-' + randomBytes(10).toString('hex')
const REFRESH_TOKEN = '1//' + randomBytes(10).toString('hex')
const API_KEY = 'sk-' + randomBytes(10).toString('hex')

const ca = await createDevCa()
const server = await ca.issueServer({ commonName: 'gateway.test' })
const dir = t.testdir()
const files = await writeFiles(dir, {
  'ca.crt': ca.cert,
  'server.crt': server.cert,
  'server.key': server.key,
  'smart.key': generateKeyPairSync('ec', { namedCurve: 'P-384' }).privateKey.export({ type: 'pkcs8', format: 'pem' }) as string
})
const tokens = await startTokenServer('ya29.probe')
t.teardown(async () => { await tokens.close() })

const base = {
  TLS_CERT_FILE: files['server.crt'],
  TLS_KEY_FILE: files['server.key'],
  TLS_CLIENT_CA_FILE: files['ca.crt'],
  EHR_UPSTREAM_URL: 'https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/fhirStores/s/fhir',
  TOKEN_KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
  TOKEN_ISSUER: 'https://gw.test'
}
const oauth = { ...base, GOOGLE_OAUTH_CLIENT_ID: 'id.apps.googleusercontent.com', GOOGLE_OAUTH_CLIENT_SECRET: CLIENT_SECRET, GOOGLE_OAUTH_REFRESH_TOKEN: REFRESH_TOKEN, GOOGLE_TOKEN_URL: tokens.url }

interface CheckJson { upstreamAuth: { mode: string, description: string, probe: { expiresAt?: string, skipped?: string } | null } }

t.test('config check says which upstream auth mode is active', async t => {
  const cases: Array<[Record<string, string>, string, RegExp]> = [
    [base, 'none', /^Upstream authentication: none/m],
    [{ ...base, EHR_API_KEY: API_KEY }, 'api-key', /^Upstream authentication: static API key in x-api-key\.$/m],
    [oauth, 'google-oauth', /^Upstream authentication: Google OAuth2 client \(refresh token\)\.$/m],
    [{ ...oauth, EHR_API_KEY: API_KEY, EHR_API_KEY_HEADER: 'X-Goog-Api-Key' }, 'google-oauth+api-key', /^Upstream authentication: Google OAuth2 client \(refresh token\), plus static API key in x-goog-api-key\.$/m],
    [{ ...base, SMART_TOKEN_URL: tokens.url, SMART_CLIENT_ID: 'c', SMART_PRIVATE_KEY_FILE: files['smart.key'] }, 'smart', /^Upstream authentication: SMART Backend Services/m]
  ]
  for (const [env, mode, line] of cases) {
    const r = await ehrctl(['config', 'check'], { env, cwd: dir })
    t.equal(r.code, 0, r.stderr)
    t.match(r.stdout, line, mode)
    t.notMatch(r.stdout, CLIENT_SECRET)
    t.notMatch(r.stdout, REFRESH_TOKEN)
    t.notMatch(r.stdout, 'PRIVATE KEY')
    const json = await ehrctl(['config', 'check', '--json'], { env, cwd: dir })
    t.equal(parseJson<CheckJson>(json).upstreamAuth.mode, mode)
    t.equal(parseJson<CheckJson>(json).upstreamAuth.probe, null, 'no probe unless asked')
  }
  t.equal(tokens.requests.length, 0, 'config check alone fetches nothing')
})

t.test('--probe fetches one token and prints only its expiry', async t => {
  const now = new Date('2026-12-03T12:00:00Z')
  const r = await ehrctl(['config', 'check', '--probe'], { env: oauth, cwd: dir, now: () => now })
  t.equal(r.code, 0, r.stderr)
  t.match(r.stdout, /^Token probe: fetched an upstream access token; it expires at 2026-12-03T13:00:00\.000Z \(in 3600 s\)\.$/m)
  t.notMatch(r.stdout, 'ya29.probe', 'never the token')
  t.equal(tokens.requests.length, 1)
  t.equal(tokens.requests[0]?.form['grant_type'], 'refresh_token')
  const json = await ehrctl(['config', 'check', '--probe', '--json'], { env: oauth, cwd: dir, now: () => now })
  t.equal(parseJson<CheckJson>(json).upstreamAuth.probe?.expiresAt, '2026-12-03T13:00:00.000Z')
  t.notMatch(json.stdout, 'ya29.probe')

  const keyOnly = await ehrctl(['config', 'check', '--probe'], { env: { ...base, EHR_API_KEY: API_KEY }, cwd: dir })
  t.equal(keyOnly.code, 0)
  t.match(keyOnly.stdout, /^Token probe skipped: no upstream token source is configured/m)
})

t.test('--probe fails with exit 1 and says what the endpoint answered', async t => {
  tokens.setHandler((_req, res) => { res.writeHead(400, { 'content-type': 'application/json' }).end('{"error":"invalid_grant","error_description":"Token has been expired or revoked."}') })
  const r = await ehrctl(['config', 'check', '--probe'], { env: oauth, cwd: dir })
  t.equal(r.code, 1)
  t.equal(r.stdout, '')
  t.equal(r.stderr, "ehrctl: the gateway's own credentials for the EHR API could not be obtained (google-oauth): token endpoint answered 400 invalid_grant\n")
  t.notMatch(r.stderr, CLIENT_SECRET)
  t.notMatch(r.stderr, REFRESH_TOKEN)
  const json = await ehrctl(['config', 'check', '--probe', '--json'], { env: oauth, cwd: dir })
  t.equal(json.code, 1)
  t.equal(parseJson<JsonError>(json).error.code, 'UPSTREAM_AUTH_FAILED')

  const down = await ehrctl(['config', 'check', '--probe'], { env: { ...oauth, GOOGLE_TOKEN_URL: 'http://127.0.0.1:1/token' }, cwd: dir })
  t.equal(down.code, 1)
  t.match(down.stderr, /could not be obtained \(google-oauth\): token endpoint unreachable/)
})

t.test('token-source problems are config problems', async t => {
  const r = await ehrctl(['config', 'check', '--json'], { env: { ...oauth, GOOGLE_OAUTH_REFRESH_TOKEN: '', SMART_CLIENT_ID: 'c' }, cwd: dir })
  t.equal(r.code, 1)
  t.match(parseJson<JsonError>(r).error, { code: 'CONFIG_INVALID', problems: [{ variable: 'GOOGLE_OAUTH_*' }, { variable: 'SMART_*' }] })
  t.notMatch(r.stdout, CLIENT_SECRET)
})
