import { randomBytes } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { inspect } from 'node:util'
import t from 'tap'
import { ConfigError, GATEWAY_NEEDS, loadConfig, loadGatewayConfig } from '../../shared/config.js'
import type { Env } from '../../shared/config.js'

const kek = randomBytes(32).toString('base64')
const full: Env = {
  DATABASE_URL: 'postgres://gw:s3cretpw@db.internal:5432/ehr',
  TLS_CERT_FILE: '/etc/gw/server.crt',
  TLS_KEY_FILE: '/etc/gw/server.key',
  TLS_CLIENT_CA_FILE: '/etc/gw/ca.crt',
  EHR_UPSTREAM_URL: 'https://ehr.example/fhir/R4',
  EHR_API_KEY: 'the-api-key-value',
  TOKEN_KEY_ENCRYPTION_KEY: kek
}

function problems (fn: () => unknown): Record<string, string> {
  try {
    fn()
  } catch (err) {
    if (err instanceof ConfigError) return Object.fromEntries(err.problems.map(p => [p.variable, p.message]))
    throw err
  }
  return {}
}

t.test('defaults of the contract', async t => {
  const config = loadGatewayConfig({ ...full, GATEWAY_HOST: 'gw.example' })
  t.equal(config.gateway.port, 8443)
  t.equal(config.gateway.host, 'gw.example')
  t.equal(config.ops.host, '127.0.0.1')
  t.equal(config.ops.port, 9090)
  t.equal(config.upstream.proxyPrefix, '/fhir')
  t.equal(config.upstream.apiKeyHeader, 'x-api-key')
  t.equal(config.tokens.ttlSeconds, 300)
  t.equal(config.tokens.issuer, 'https://gw.example:8443')
  t.equal(config.tokens.audience, 'https://gw.example:8443/fhir')
  t.equal(config.rateLimit.max, 600)
  t.equal(config.rateLimit.windowMs, 60_000)
  t.equal(config.log.level, 'info')
  t.ok(Object.isFrozen(config) && Object.isFrozen(config.gateway) && Object.isFrozen(config.gateway.trustedProxies))
})

t.test('one error lists every problem by variable name, never a value', async t => {
  const env: Env = {
    GATEWAY_PORT: 'eighty',
    OPS_PORT: '70000',
    EHR_UPSTREAM_URL: 'ftp://nope',
    TOKEN_KEY_ENCRYPTION_KEY: 'short-secret-value',
    TRUSTED_PROXIES: '10.0.0.0/8,not-a-cidr',
    RATE_LIMIT_WINDOW: 'whenever',
    LOG_LEVEL: 'loud',
    NODE_ENV: 'production'
  }
  let message = ''
  try {
    loadConfig(env, { needs: GATEWAY_NEEDS })
  } catch (err) {
    message = (err as Error).message
  }
  const found = problems(() => loadConfig(env, { needs: GATEWAY_NEEDS }))
  for (const v of ['GATEWAY_PORT', 'OPS_PORT', 'EHR_UPSTREAM_URL', 'TOKEN_KEY_ENCRYPTION_KEY', 'TRUSTED_PROXIES', 'RATE_LIMIT_WINDOW', 'LOG_LEVEL', 'DATABASE_URL', 'TLS_CERT_FILE', 'TLS_KEY_FILE', 'TLS_CLIENT_CA_FILE']) {
    t.ok(found[v] !== undefined, `${v} reported`)
    t.match(message, v)
  }
  t.notMatch(message, 'short-secret-value')
})

t.test('each command needs only what it uses', async t => {
  t.same(problems(() => loadConfig({ TLS_CLIENT_CA_FILE: '/ca.pem' }, { needs: ['database', 'clientCa'] })), {})
  t.same(Object.keys(problems(() => loadConfig({}, { needs: ['clientCa'] }))), ['TLS_CLIENT_CA_FILE'])
  t.same(Object.keys(problems(() => loadConfig({ NODE_ENV: 'production' }, { needs: ['database'] }))), ['DATABASE_URL'])
  t.same(problems(() => loadConfig({}, { needs: ['database'] })), {}, 'development falls back to the embedded Postgres')
  const dev = loadConfig({}, { needs: ['tokenKeys'], devKeyEncryptionKey: () => kek })
  t.equal(dev.tokens.keyEncryptionKey?.reveal(), kek)
  t.ok(problems(() => loadConfig({ NODE_ENV: 'production' }, { needs: ['tokenKeys'], devKeyEncryptionKey: () => kek }))['TOKEN_KEY_ENCRYPTION_KEY'])
})

t.test('<NAME>_FILE secrets and .env', async t => {
  const dir = t.testdir({ 'api-key': 'from-a-file\n', '.env': 'EHR_API_KEY_HEADER=X-Key\nGATEWAY_PORT=9443\n' })
  const { EHR_API_KEY: _omit, ...rest } = full
  const config = loadGatewayConfig({ ...rest, EHR_API_KEY_FILE: join(dir, 'api-key') }, { dotenvPath: join(dir, '.env') })
  t.equal(config.upstream.apiKey?.reveal(), 'from-a-file')
  t.equal(config.upstream.apiKeyHeader, 'x-key')
  t.equal(config.gateway.port, 9443, '.env fills what the environment leaves unset')
  t.equal(loadGatewayConfig({ ...full, GATEWAY_PORT: '1234' }, { dotenvPath: join(dir, '.env') }).gateway.port, 1234, 'the environment wins over .env')
  t.ok(problems(() => loadGatewayConfig({ ...full, EHR_API_KEY_FILE: join(dir, 'api-key') }))['EHR_API_KEY_FILE'], 'both set is refused')
  t.match(problems(() => loadGatewayConfig({ ...rest, EHR_API_KEY_FILE: join(dir, 'missing') }))['EHR_API_KEY_FILE'], /ENOENT/)
  t.ok(problems(() => loadGatewayConfig({ ...full, TLS_CERT_FILE_FILE: join(dir, 'api-key') })), 'no _FILE for non-secrets')
  writeFileSync(join(dir, 'kek'), kek)
  const { TOKEN_KEY_ENCRYPTION_KEY: _k, ...noKek } = full
  t.equal(loadGatewayConfig({ ...noKek, TOKEN_KEY_ENCRYPTION_KEY_FILE: join(dir, 'kek') }).tokens.keyEncryptionKey?.reveal(), kek)
  t.same(loadGatewayConfig(full, { dotenvPath: join(dir, 'no-such.env') }).gateway.port, 8443, 'a missing .env is fine')
  const withDefaults = { dotenvPath: join(dir, '.env'), defaults: { GATEWAY_PORT: '1', OPS_PORT: '2' } }
  t.equal(loadGatewayConfig(full, withDefaults).gateway.port, 9443, '.env wins over program defaults')
  t.equal(loadGatewayConfig(full, withDefaults).ops.port, 2, 'program defaults fill what neither sets')
})

t.test('secrets are redacted however the config is printed', async t => {
  const config = loadGatewayConfig(full)
  for (const shown of [JSON.stringify(config), inspect(config, { depth: 10 })]) {
    t.notMatch(shown, 'the-api-key-value')
    t.notMatch(shown, 's3cretpw')
    t.notMatch(shown, kek)
  }
  t.match(JSON.stringify(config), 'postgres://gw:***@db.internal:5432/ehr')
})

t.test('features of later releases are refused, not silently ignored', async t => {
  t.same(problems(() => loadGatewayConfig({ ...full, TOKEN_SINGLE_USE: 'false', GATEWAY_WORKERS: '1' })), {})
})

t.test('proof-of-possession switches, DPoP window and the public URL', async t => {
  const defaults = loadGatewayConfig(full)
  t.same([defaults.tokens.requireDpop, defaults.tokens.singleUse, defaults.tokens.encrypt, defaults.dpop.nonce], [false, false, false, false])
  t.equal(defaults.dpop.maxAgeSeconds, 60)
  t.equal(defaults.gateway.publicUrl, new URL(defaults.tokens.issuer).origin, 'the public URL defaults to the issuer')
  const on = loadGatewayConfig({ ...full, TOKEN_REQUIRE_DPOP: 'true', TOKEN_SINGLE_USE: '1', TOKEN_ENCRYPT: 'true', DPOP_NONCE: 'true', DPOP_MAX_AGE_SECONDS: '30', GATEWAY_PUBLIC_URL: 'https://GW.Example:443/edge/' })
  t.same([on.tokens.requireDpop, on.tokens.singleUse, on.tokens.encrypt, on.dpop.nonce], [true, true, true, true])
  t.equal(on.dpop.maxAgeSeconds, 30)
  t.equal(on.gateway.publicUrl, 'https://gw.example/edge', 'normalised: host case, default port, trailing slash')
  t.ok(problems(() => loadGatewayConfig({ ...full, TOKEN_SINGLE_USE: 'yes' }))['TOKEN_SINGLE_USE'], 'a typo is not false')
  t.ok(problems(() => loadGatewayConfig({ ...full, DPOP_MAX_AGE_SECONDS: '0' }))['DPOP_MAX_AGE_SECONDS'])
  t.ok(problems(() => loadGatewayConfig({ ...full, GATEWAY_PUBLIC_URL: 'https://gw.example/?x=1' }))['GATEWAY_PUBLIC_URL'])
  t.ok(problems(() => loadGatewayConfig({ ...full, GATEWAY_PUBLIC_URL: 'https://u:p@gw.example' }))['GATEWAY_PUBLIC_URL'])
  t.ok(problems(() => loadGatewayConfig({ ...full, GATEWAY_PUBLIC_URL: 'https://' }))['GATEWAY_PUBLIC_URL'])
})

t.test('GATEWAY_WORKERS: a whole number from 1 to 64, or auto', async t => {
  const { availableParallelism } = await import('node:os')
  t.equal(loadGatewayConfig(full).gateway.workers, 1, 'default: one process, no cluster')
  t.equal(loadGatewayConfig({ ...full, GATEWAY_WORKERS: '4' }).gateway.workers, 4)
  t.equal(loadGatewayConfig({ ...full, GATEWAY_WORKERS: '64' }).gateway.workers, 64)
  t.equal(loadGatewayConfig({ ...full, GATEWAY_WORKERS: 'auto' }).gateway.workers, availableParallelism())
  t.equal(loadGatewayConfig({ ...full, GATEWAY_WORKERS: ' AUTO ' }).gateway.workers, availableParallelism())
  for (const bad of ['0', '-1', '65', 'two', '1.5', '2x', '08']) {
    t.match(problems(() => loadGatewayConfig({ ...full, GATEWAY_WORKERS: bad }))['GATEWAY_WORKERS'], /whole number from 1 to 64, or auto/, bad)
  }
})

t.test('upstream URL and proxy prefix shapes', async t => {
  t.ok(problems(() => loadGatewayConfig({ ...full, EHR_UPSTREAM_URL: 'https://user:pw@ehr.example/fhir' }))['EHR_UPSTREAM_URL'])
  t.ok(problems(() => loadGatewayConfig({ ...full, EHR_UPSTREAM_URL: 'https://ehr.example/fhir?key=1' }))['EHR_UPSTREAM_URL'])
  t.ok(problems(() => loadGatewayConfig({ ...full, PROXY_PREFIX: 'fhir' }))['PROXY_PREFIX'])
  t.ok(problems(() => loadGatewayConfig({ ...full, PROXY_PREFIX: '/fhir/' }))['PROXY_PREFIX'])
  t.equal(loadGatewayConfig({ ...full, PROXY_PREFIX: '/ehr/r4' }).upstream.proxyPrefix, '/ehr/r4')
  t.same(loadGatewayConfig({ ...full, TRUSTED_PROXIES: '10.0.0.0/8, ::1, 192.168.1.1' }).gateway.trustedProxies, ['10.0.0.0/8', '::1', '192.168.1.1'])
})

t.test('.env.example names every variable of the schema, and only those', async t => {
  const { readFile } = await import('node:fs/promises')
  const { VARIABLES, FILE_SECRETS } = await import('../../shared/config.js')
  const example = await readFile(new URL('../../.env.example', import.meta.url), 'utf8')
  const named = new Set(example.match(/\b[A-Z][A-Z0-9_]{2,}\b/g) ?? [])
  for (const v of VARIABLES) t.ok(named.has(v), `${v} in .env.example`)
  for (const v of FILE_SECRETS) t.ok(VARIABLES.includes(v), `${v} is a schema variable`)
})

t.test('production refuses what only works on one host or leaks credentials', async t => {
  const production = { ...full, NODE_ENV: 'production' }
  t.match(problems(() => loadGatewayConfig(production))['TOKEN_ISSUER'], /required in production/)
  t.same(problems(() => loadGatewayConfig({ ...production, TOKEN_ISSUER: 'https://gw.example' })), {})
  t.same(problems(() => loadGatewayConfig({ ...production, GATEWAY_HOST: 'gw.example' })), {}, 'a named host derives one issuer')
  t.match(problems(() => loadGatewayConfig({ ...production, TOKEN_ISSUER: 'https://gw.example', EHR_UPSTREAM_URL: 'http://ehr.internal/fhir' }))['EHR_UPSTREAM_URL'], /https/)
  t.same(problems(() => loadGatewayConfig({ ...production, TOKEN_ISSUER: 'https://gw.example', EHR_UPSTREAM_URL: 'http://127.0.0.1:8080/fhir' })), {}, 'a sidecar on this host may be plain http')
})

t.test('REDIS_URL: redis:// or rediss://, its password a secret', async t => {
  const config = loadGatewayConfig({ ...full, REDIS_URL: 'rediss://:p4ss-w0rd@redis.internal:6380/2' })
  t.equal(config.rateLimit.redisUrl?.reveal(), 'rediss://:p4ss-w0rd@redis.internal:6380/2')
  t.notMatch(JSON.stringify(config), /p4ss-w0rd/)
  t.notMatch(inspect(config, { depth: Infinity }), /p4ss-w0rd/)
  t.match(JSON.stringify(config), /rediss:\/\/:\*\*\*@redis\.internal:6380\/2/)
  t.equal(config.rateLimit.fallbackMax, 600, 'the fallback limit defaults to RATE_LIMIT_MAX')
  t.equal(loadGatewayConfig({ ...full, RATE_LIMIT_MAX: '90', RATE_LIMIT_FALLBACK_MAX: '30' }).rateLimit.fallbackMax, 30)
  t.equal(loadGatewayConfig(full).rateLimit.redisUrl, undefined, 'per instance by default')
  for (const bad of ['http://redis.internal', 'redis.internal:6379', 'redis://', 'redis://host/not-a-db']) {
    const found = problems(() => loadGatewayConfig({ ...full, REDIS_URL: bad }))
    t.ok(found['REDIS_URL'], `${bad}: ${found['REDIS_URL']}`)
  }
  const found = problems(() => loadGatewayConfig({ ...full, REDIS_URL: 'http://:leaky-pass@x' }))
  t.notMatch(JSON.stringify(found), /leaky-pass/, 'the message never repeats the URL')
  t.ok(problems(() => loadGatewayConfig({ ...full, RATE_LIMIT_FALLBACK_MAX: '0' }))['RATE_LIMIT_FALLBACK_MAX'])
})

t.test('CORS_ORIGINS: exact origins only, never a wildcard', async t => {
  t.same(loadGatewayConfig(full).cors.origins, [], 'no CORS by default')
  t.same(loadGatewayConfig({ ...full, CORS_ORIGINS: 'https://App.Hospital.internal, https://b.example:8443/, http://localhost:5173' }).cors.origins,
    ['https://app.hospital.internal', 'https://b.example:8443', 'http://localhost:5173'], 'normalised as browsers send Origin')
  t.same(loadGatewayConfig({ ...full, CORS_ORIGINS: 'https://a.example:443' }).cors.origins, ['https://a.example'], 'default port dropped')
  for (const bad of ['*', 'null', 'https://a.example/app', 'https://a.example?x=1', 'a.example', 'ftp://a.example', 'https://user@a.example', 'https://a.example,*']) {
    t.ok(problems(() => loadGatewayConfig({ ...full, CORS_ORIGINS: bad }))['CORS_ORIGINS'], `${bad} refused`)
  }
  const production = { ...full, NODE_ENV: 'production', TOKEN_ISSUER: 'https://gw.example' }
  t.match(problems(() => loadGatewayConfig({ ...production, CORS_ORIGINS: 'http://frontend.example' }))['CORS_ORIGINS'], /https/)
  t.same(problems(() => loadGatewayConfig({ ...production, CORS_ORIGINS: 'https://frontend.example,http://localhost:3000' })), {})
})

t.test('FORWARDED_CERT_HEADER: one of the two headers, Envoy\'s by default', async t => {
  t.equal(loadGatewayConfig(full).gateway.forwardedCertHeader, 'x-forwarded-client-cert')
  t.equal(loadGatewayConfig({ ...full, FORWARDED_CERT_HEADER: 'x-ssl-client-cert' }).gateway.forwardedCertHeader, 'x-ssl-client-cert')
  t.ok(problems(() => loadGatewayConfig({ ...full, FORWARDED_CERT_HEADER: 'x-client-cert' }))['FORWARDED_CERT_HEADER'], 'anything else refused by name')
})
