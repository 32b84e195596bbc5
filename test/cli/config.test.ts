import t from 'tap'
import type { Test } from 'tap'
import { randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { createDevCa } from '../../gateway/demo/pki.js'
import { ehrctl, parseJson, writeFiles } from './harness.js'
import type { JsonError } from './harness.js'

const DAY_MS = 24 * 60 * 60 * 1000
const API_KEY = 'sk-live-RECOGNIZABLE-4f8a9c'
const KEK = randomBytes(32).toString('base64')
const DB_PASSWORD = 'hunter2-db-PASSWORD'

const ca = await createDevCa()
const server = await ca.issueServer({ commonName: 'gateway.test' })
const otherServer = await ca.issueServer({ commonName: 'other.test' })
const oldServer = await ca.issueServer({ commonName: 'old.test', notBefore: new Date(Date.now() - 2 * DAY_MS), notAfter: new Date(Date.now() - DAY_MS) })
const dir = t.testdir()
const files = await writeFiles(dir, {
  'ca.crt': ca.cert,
  'server.crt': server.cert,
  'server.key': server.key,
  'other.key': otherServer.key,
  'old.crt': oldServer.cert,
  'old.key': oldServer.key,
  'api-key': API_KEY + '\n'
})

const valid = {
  DATABASE_URL: `postgres://ehr:${DB_PASSWORD}@db.internal:5432/ehr`,
  TLS_CERT_FILE: files['server.crt'],
  TLS_KEY_FILE: files['server.key'],
  TLS_CLIENT_CA_FILE: files['ca.crt'],
  EHR_UPSTREAM_URL: 'http://127.0.0.1:1/fhir',
  EHR_API_KEY: API_KEY,
  TOKEN_KEY_ENCRYPTION_KEY: KEK,
  TOKEN_ISSUER: 'https://ehr-gateway.hospital.example',
  NODE_ENV: 'production'
}

const secretsAbsent = (t: Test, text: string): void => {
  t.notMatch(text, API_KEY, 'EHR_API_KEY never printed')
  t.notMatch(text, KEK, 'TOKEN_KEY_ENCRYPTION_KEY never printed')
  t.notMatch(text, DB_PASSWORD, 'database password never printed')
}

interface CheckJson {
  ok: boolean
  config: {
    database: { url: string }
    gateway: { port: number, host: string }
    upstream: { url: string, apiKey: string | null, proxyPrefix: string }
    tokens: { keyEncryptionKey: string, ttlSeconds: number }
    tls: { certFile: string }
  }
}

t.test('config check with a full valid environment prints the effective config, redacted', async t => {
  const r = await ehrctl(['config', 'check'], { env: valid, cwd: dir })
  t.equal(r.code, 0, r.stderr)
  t.equal(r.stderr, '')
  t.match(r.stdout, /^upstream\.url: +http:\/\/127\.0\.0\.1:1\/fhir$/m)
  t.match(r.stdout, /^upstream\.apiKey: +\[redacted\]$/m)
  t.match(r.stdout, /^tokens\.keyEncryptionKey: +\[redacted\]$/m)
  t.match(r.stdout, /^database\.url: +postgres:\/\/ehr:\*\*\*@db\.internal:5432\/ehr$/m)
  t.match(r.stdout, /^gateway\.trustedProxies: +\(none\)$/m)
  t.match(r.stdout, /^gateway\.port: +8443$/m)
  t.match(r.stdout, 'Configuration is valid')
  secretsAbsent(t, r.stdout)

  const json = await ehrctl(['config', 'check', '--json'], { env: valid, cwd: dir })
  t.equal(json.code, 0, json.stderr)
  secretsAbsent(t, json.stdout)
  t.match(parseJson<CheckJson>(json), {
    ok: true,
    config: {
      database: { url: 'postgres://ehr:***@db.internal:5432/ehr' },
      upstream: { url: 'http://127.0.0.1:1/fhir', apiKey: '[redacted]', proxyPrefix: '/fhir' },
      tokens: { keyEncryptionKey: '[redacted]', ttlSeconds: 300 },
      tls: { certFile: files['server.crt'] }
    }
  })
})

t.test('a secret from <NAME>_FILE is redacted too', async t => {
  const { EHR_API_KEY: _dropped, ...rest } = valid
  const r = await ehrctl(['config', 'check', '--json'], { env: { ...rest, EHR_API_KEY_FILE: files['api-key'] }, cwd: dir })
  t.equal(r.code, 0, r.stderr)
  t.equal(parseJson<CheckJson>(r).config.upstream.apiKey, '[redacted]')
  secretsAbsent(t, r.stdout)
})

t.test('config check names every bad or missing variable, and no secret', async t => {
  const env = {
    NODE_ENV: 'production',
    EHR_API_KEY: API_KEY,
    GATEWAY_PORT: 'eighty',
    TLS_CLIENT_CA_FILE: files['ca.crt'],
    TRUSTED_PROXIES: '10.0.0.0/8,not-a-cidr',
    TOKEN_SINGLE_USE: 'yes-please'
  }
  const r = await ehrctl(['config', 'check'], { env, cwd: dir })
  t.equal(r.code, 1)
  t.equal(r.stdout, '')
  t.match(r.stderr, /^ehrctl: invalid environment:\n/)
  for (const variable of ['DATABASE_URL', 'GATEWAY_PORT', 'TLS_CERT_FILE', 'TLS_KEY_FILE', 'EHR_UPSTREAM_URL', 'TOKEN_KEY_ENCRYPTION_KEY', 'TRUSTED_PROXIES', 'TOKEN_SINGLE_USE']) {
    t.match(r.stderr, new RegExp(`^ {2}${variable}: `, 'm'), variable)
  }
  t.notMatch(r.stderr, /^ {2}TLS_CLIENT_CA_FILE/m, 'a good variable is not a problem')
  t.notMatch(r.stderr, /\n\s+at /, 'no stack trace')
  secretsAbsent(t, r.stderr)

  const json = await ehrctl(['config', 'check', '--json'], { env, cwd: dir })
  t.equal(json.code, 1)
  t.equal(json.stderr, '')
  secretsAbsent(t, json.stdout)
  const { error } = parseJson<JsonError>(json)
  t.equal(error.code, 'CONFIG_INVALID')
  t.same(new Set(error.problems?.map(p => p.variable)), new Set(['DATABASE_URL', 'GATEWAY_PORT', 'TLS_CERT_FILE', 'TLS_KEY_FILE', 'EHR_UPSTREAM_URL', 'TOKEN_KEY_ENCRYPTION_KEY', 'TOKEN_ISSUER', 'TRUSTED_PROXIES', 'TOKEN_SINGLE_USE']))
})

t.test('config check loads the TLS files', async t => {
  const cases: Array<[string, Record<string, string>, string, RegExp]> = [
    ['key of another certificate', { TLS_KEY_FILE: files['other.key'] }, 'TLS_KEY_FILE', /does not match the certificate in TLS_CERT_FILE/],
    ['a key where the certificate belongs', { TLS_CERT_FILE: files['server.key'] }, 'TLS_CERT_FILE', /does not hold a PEM certificate/],
    ['a certificate where the key belongs', { TLS_KEY_FILE: files['server.crt'] }, 'TLS_KEY_FILE', /does not hold an unencrypted PEM private key/],
    ['a missing key file', { TLS_KEY_FILE: join(dir, 'gone.key') }, 'TLS_KEY_FILE', /cannot read '.*gone\.key': ENOENT/],
    ['a missing CA bundle', { TLS_CLIENT_CA_FILE: 'nope.crt' }, 'TLS_CLIENT_CA_FILE', /cannot read '.*nope\.crt': ENOENT/],
    ['a key as the CA bundle', { TLS_CLIENT_CA_FILE: files['server.key'] }, 'TLS_CLIENT_CA_FILE', /does not hold a bundle of PEM CA certificates/],
    ['an expired server certificate', { TLS_CERT_FILE: files['old.crt'], TLS_KEY_FILE: files['old.key'] }, 'TLS_CERT_FILE', /expired on \d{4}-/]
  ]
  for (const [label, change, variable, message] of cases) {
    const r = await ehrctl(['config', 'check', '--json'], { env: { ...valid, ...change }, cwd: dir })
    t.equal(r.code, 1, label)
    t.match(parseJson<JsonError>(r).error.problems, [{ variable, message }], label)
    t.equal(parseJson<JsonError>(r).error.problems?.length, 1, `${label}: the only problem`)
    secretsAbsent(t, r.stdout)
    t.notMatch(r.stdout, 'PRIVATE KEY', `${label}: no key material`)
  }
})

t.test('variable and file problems come in one list', async t => {
  const r = await ehrctl(['config', 'check'], { env: { ...valid, GATEWAY_PORT: '70000', TLS_KEY_FILE: files['other.key'] }, cwd: dir })
  t.equal(r.code, 1)
  t.match(r.stderr, /^ {2}GATEWAY_PORT: /m)
  t.match(r.stderr, /^ {2}TLS_KEY_FILE: .*does not match/m)
})

t.test('.env in the working directory is merged beneath the environment', async t => {
  const cwd = t.testdir()
  const dotenv = Object.entries({ ...valid, GATEWAY_PORT: '1111', OPS_PORT: '9191' }).map(([k, v]) => `${k}=${v}`).join('\n')
  await writeFile(join(cwd, '.env'), dotenv + '\n')
  const r = await ehrctl(['config', 'check', '--json'], { env: { GATEWAY_PORT: '2222' }, cwd, dotenvPath: '.env' })
  t.equal(r.code, 0, r.stdout + r.stderr)
  const config = parseJson<CheckJson>(r).config as CheckJson['config'] & { ops: { port: number } }
  t.equal(config.gateway.port, 2222, 'the environment wins')
  t.equal(config.ops.port, 9191, '.env fills what the environment lacks')

  const bad = await ehrctl(['config', 'check'], { env: { TLS_KEY_FILE: files['other.key'] }, cwd, dotenvPath: '.env' })
  t.equal(bad.code, 1)
  t.match(bad.stderr, /TLS_KEY_FILE: .*does not match/)
  const schemaBad = await ehrctl(['config', 'check'], { env: { GATEWAY_PORT: 'x', TLS_KEY_FILE: files['other.key'] }, cwd, dotenvPath: '.env' })
  t.match(schemaBad.stderr, /TLS_KEY_FILE: .*does not match/, 'file checks read .env even when the schema refused it')
  t.match(schemaBad.stderr, /GATEWAY_PORT: /)
})

t.test('an unexpected failure is one line and exit 1', async t => {
  let calls = 0
  const r = await ehrctl(['config', 'check'], {
    env: valid,
    cwd: dir,
    stdoutWrite: () => {
      calls++
      throw new Error('write EPIPE\n    at Socket.write (node:net:1:1)')
    }
  })
  t.equal(calls, 1)
  t.equal(r.code, 1)
  t.equal(r.stderr, 'ehrctl: write EPIPE\n')
})
