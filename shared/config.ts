import { readFileSync } from 'node:fs'
import { availableParallelism, hostname } from 'node:os'
import { resolve } from 'node:path'
import { isIPv4, isIPv6 } from 'node:net'
import { parseEnv } from 'node:util'
import envSchema from 'env-schema'
import { parseDuration } from './duration.js'
import { GatewayError } from './errors.js'
import { Secret, maskUrlPassword } from './secret.js'
import { parseUpstreamAuth } from './upstream-auth-config.js'
import type { UpstreamTokenSourceConfig } from './upstream-auth-config.js'

export type Env = Readonly<Record<string, string | undefined>>

// Switches: the spellings shells and compose files use; anything else is a typo to report.
const BOOLEAN = ['true', 'false', '1', '0']

// The one schema for every variable the gateway and ehrctl read. Types and ranges are
// checked here; which variables are *required* depends on what the caller is about to do
// (see `Need`), so an admin laptop running `ehrctl machine add` needs no gateway TLS key.
const schema = {
  type: 'object',
  properties: {
    NODE_ENV: { type: 'string', enum: ['development', 'test', 'production'], default: 'development' },
    DATABASE_URL: { type: 'string', pattern: '^postgres(ql)?://' },
    DATABASE_POOL_MAX: { type: 'integer', minimum: 1, maximum: 200, default: 10 },
    GATEWAY_HOST: { type: 'string', minLength: 1, default: '0.0.0.0' },
    GATEWAY_PORT: { type: 'integer', minimum: 0, maximum: 65535, default: 8443 },
    OPS_HOST: { type: 'string', minLength: 1, default: '127.0.0.1' },
    OPS_PORT: { type: 'integer', minimum: 0, maximum: 65535, default: 9090 },
    TLS_CERT_FILE: { type: 'string', minLength: 1 },
    TLS_KEY_FILE: { type: 'string', minLength: 1 },
    TLS_CLIENT_CA_FILE: { type: 'string', minLength: 1 },
    TRUSTED_PROXIES: { type: 'string', default: '' },
    FORWARDED_CERT_HEADER: { type: 'string', enum: ['x-forwarded-client-cert', 'x-ssl-client-cert'], default: 'x-forwarded-client-cert' },
    EHR_UPSTREAM_URL: { type: 'string', pattern: '^https?://' },
    PROXY_PREFIX: { type: 'string', pattern: '^/[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*$', default: '/fhir' },
    EHR_API_KEY: { type: 'string', minLength: 1 },
    EHR_API_KEY_HEADER: { type: 'string', pattern: "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", default: 'x-api-key' },
    UPSTREAM_CONNECTIONS: { type: 'integer', minimum: 1, maximum: 4096, default: 64 },
    UPSTREAM_CONNECT_TIMEOUT_MS: { type: 'integer', minimum: 1, default: 5000 },
    UPSTREAM_HEADERS_TIMEOUT_MS: { type: 'integer', minimum: 1, default: 30_000 },
    UPSTREAM_BODY_TIMEOUT_MS: { type: 'integer', minimum: 1, default: 30_000 },
    BODY_LIMIT_BYTES: { type: 'integer', minimum: 1, default: 10 * 1024 * 1024 },
    UPSTREAM_AUTH_TIMEOUT_MS: { type: 'integer', minimum: 100, maximum: 60_000, default: 5000 },
    TOKEN_ISSUER: { type: 'string', pattern: '^https?://' },
    TOKEN_AUDIENCE: { type: 'string', minLength: 1 },
    TOKEN_TTL_SECONDS: { type: 'integer', minimum: 10, maximum: 86_400, default: 300 },
    TOKEN_ALG: { type: 'string', enum: ['EdDSA', 'ES256'], default: 'EdDSA' },
    TOKEN_CLOCK_TOLERANCE_SECONDS: { type: 'integer', minimum: 0, maximum: 300, default: 5 },
    TOKEN_KEY_ENCRYPTION_KEY: { type: 'string', minLength: 1 },
    REGISTRY_CACHE_TTL_MS: { type: 'integer', minimum: 0, maximum: 600_000, default: 30_000 },
    RATE_LIMIT_MAX: { type: 'integer', minimum: 1, default: 600 },
    RATE_LIMIT_WINDOW: { type: 'string', default: '1 minute' },
    RATE_LIMIT_FALLBACK_MAX: { type: 'integer', minimum: 1 },
    REDIS_URL: { type: 'string' },
    CORS_ORIGINS: { type: 'string' },
    SHUTDOWN_GRACE_MS: { type: 'integer', minimum: 0, default: 10_000 },
    AUDIT_BUFFER_MAX: { type: 'integer', minimum: 1, maximum: 10_000_000, default: 100_000 },
    AUDIT_BATCH_SIZE: { type: 'integer', minimum: 1, maximum: 3000, default: 500 },
    AUDIT_FLUSH_INTERVAL_MS: { type: 'integer', minimum: 1, maximum: 60_000, default: 200 },
    AUDIT_CLOSE_TIMEOUT_MS: { type: 'integer', minimum: 0, default: 10_000 },
    LOG_LEVEL: { type: 'string', enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], default: 'info' },
    GATEWAY_WORKERS: { type: 'string', default: '1' },
    TOKEN_REQUIRE_DPOP: { type: 'string', enum: BOOLEAN, default: 'false' },
    TOKEN_SINGLE_USE: { type: 'string', enum: BOOLEAN, default: 'false' },
    TOKEN_ENCRYPT: { type: 'string', enum: BOOLEAN, default: 'false' },
    GATEWAY_PUBLIC_URL: { type: 'string', pattern: '^https?://' },
    DPOP_MAX_AGE_SECONDS: { type: 'integer', minimum: 1, maximum: 600, default: 60 },
    DPOP_NONCE: { type: 'string', enum: BOOLEAN, default: 'false' },
    // Upstream token sources (shared/upstream-auth-config.ts checks the combinations).
    GOOGLE_OAUTH_CLIENT_ID: { type: 'string' },
    GOOGLE_OAUTH_CLIENT_SECRET: { type: 'string' },
    GOOGLE_OAUTH_REDIRECT_URI: { type: 'string' },
    GOOGLE_OAUTH_REFRESH_TOKEN: { type: 'string' },
    GOOGLE_APPLICATION_CREDENTIALS: { type: 'string' },
    GOOGLE_TOKEN_URL: { type: 'string' },
    GOOGLE_SCOPES: { type: 'string' },
    // A header value; project ids and numbers are [a-z0-9-].
    GOOGLE_QUOTA_PROJECT: { type: 'string', pattern: '^[A-Za-z0-9._:-]+$' },
    SMART_TOKEN_URL: { type: 'string' },
    SMART_CLIENT_ID: { type: 'string' },
    SMART_PRIVATE_KEY_FILE: { type: 'string' },
    SMART_KEY_ID: { type: 'string' },
    SMART_SCOPE: { type: 'string' },
    SMART_ALG: { type: 'string', enum: ['ES384', 'RS384'] }
  }
} as const

export const VARIABLES: readonly string[] = Object.keys(schema.properties)

// Secrets that may come from `<NAME>_FILE` instead (Docker/Kubernetes secrets). An explicit
// list: a glob would let any `_FILE` variable make the gateway read arbitrary files.
export const FILE_SECRETS = [
  'DATABASE_URL',
  'EHR_API_KEY',
  'TOKEN_KEY_ENCRYPTION_KEY',
  'REDIS_URL',
  'GOOGLE_OAUTH_CLIENT_ID',
  'GOOGLE_OAUTH_CLIENT_SECRET',
  'GOOGLE_OAUTH_REDIRECT_URI',
  'GOOGLE_OAUTH_REFRESH_TOKEN'
] as const

// More workers than this only multiply database connections (DATABASE_POOL_MAX each).
const MAX_WORKERS = 64

// What a caller is about to do decides which variables must be present.
export type Need = 'database' | 'clientCa' | 'serverTls' | 'upstream' | 'tokenKeys'
export const GATEWAY_NEEDS: readonly Need[] = ['database', 'clientCa', 'serverTls', 'upstream', 'tokenKeys']

export type NodeEnv = 'development' | 'test' | 'production'

export interface Config {
  readonly nodeEnv: NodeEnv
  readonly database: {
    // undefined: use the embedded Postgres (never in production)
    readonly url: Secret | undefined
    readonly poolMax: number
  }
  readonly gateway: {
    readonly host: string
    readonly port: number
    readonly trustedProxies: readonly string[]
    // The one client-certificate header the trusted proxies set (and sanitise).
    readonly forwardedCertHeader: 'x-forwarded-client-cert' | 'x-ssl-client-cert'
    readonly bodyLimitBytes: number
    readonly shutdownGraceMs: number
    // Scheme, host, port and base path clients address (a DPoP proof's htu, RFC 9449 §4.3),
    // which behind a load balancer is not the listener's; no trailing slash.
    readonly publicUrl: string
    // processes serving the listeners; 1 = no cluster, the process serves by itself
    readonly workers: number
  }
  readonly ops: { readonly host: string, readonly port: number }
  readonly tls: {
    readonly certFile: string | undefined
    readonly keyFile: string | undefined
    readonly clientCaFile: string | undefined
  }
  readonly upstream: {
    readonly url: URL | undefined
    readonly proxyPrefix: string
    readonly apiKey: Secret | undefined
    readonly apiKeyHeader: string
    readonly connections: number
    readonly connectTimeoutMs: number
    readonly headersTimeoutMs: number
    readonly bodyTimeoutMs: number
    // undefined: no token source, only EHR_API_KEY (if set)
    readonly tokenSource: UpstreamTokenSourceConfig | undefined
    readonly authTimeoutMs: number
  }
  readonly tokens: {
    readonly issuer: string
    readonly audience: string
    readonly ttlSeconds: number
    readonly alg: 'EdDSA' | 'ES256'
    readonly clockToleranceSeconds: number
    readonly keyEncryptionKey: Secret | undefined
    readonly requireDpop: boolean
    readonly singleUse: boolean
    readonly encrypt: boolean
  }
  readonly dpop: {
    // RFC 9449 §4.3 step 11: how far a proof's iat may lie in the past or the future.
    readonly maxAgeSeconds: number
    // RFC 9449 §8/§9: demand server-issued nonces.
    readonly nonce: boolean
  }
  readonly registry: { readonly cacheTtlMs: number }
  readonly rateLimit: {
    readonly max: number
    readonly windowMs: number
    // Shared counters across instances; undefined: each instance counts for itself.
    readonly redisUrl: Secret | undefined
    // The per-instance limit while Redis is unreachable.
    readonly fallbackMax: number
  }
  // Exact origins (scheme://host[:port]) allowed credentialed CORS; empty: no CORS at all.
  readonly cors: { readonly origins: readonly string[] }
  readonly audit: {
    // Rows held while Postgres is unreachable; when full, EHR traffic is refused (503).
    readonly bufferMax: number
    readonly batchSize: number
    readonly flushIntervalMs: number
    // How long shutdown keeps trying to write what is buffered.
    readonly closeTimeoutMs: number
  }
  readonly log: { readonly level: string }
}

// The gateway process needs every section; loadGatewayConfig proves it once so the
// gateway's code can rely on the fields without re-checking.
export interface GatewayConfig extends Config {
  readonly tls: { readonly certFile: string, readonly keyFile: string, readonly clientCaFile: string }
  readonly upstream: Config['upstream'] & { readonly url: URL }
  readonly tokens: Config['tokens'] & { readonly keyEncryptionKey: Secret }
}

export interface ConfigProblem { readonly variable: string, readonly message: string }
type Problem = ConfigProblem

export class ConfigError extends GatewayError {
  readonly problems: readonly Problem[]
  constructor (problems: readonly Problem[]) {
    super('CONFIG_INVALID', [problems.map(p => `  ${p.variable}: ${p.message}`).join('\n')])
    this.problems = problems
  }
}

export interface LoadOptions {
  readonly needs?: readonly Need[]
  // A .env file merged beneath `env` (real environment wins), as docker compose does.
  readonly dotenvPath?: string | false
  // Beneath both: what a program assumes when neither sets a variable (the gateway
  // process assumes NODE_ENV=production).
  readonly defaults?: Env
  // Development-only fallback for TOKEN_KEY_ENCRYPTION_KEY, read by the caller that owns the
  // data directory; the config module itself never writes files.
  readonly devKeyEncryptionKey?: () => string
}

export function readDotenv (path: string): Env {
  try {
    return parseEnv(readFileSync(path, 'utf8'))
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {}
    throw err
  }
}

// Resolves `<NAME>_FILE` for the listed secrets. Problems name the variable, never a value.
function resolveFileSecrets (env: Env, problems: Problem[]): Record<string, string | undefined> {
  const out: Record<string, string | undefined> = { ...env }
  for (const name of FILE_SECRETS) {
    const fileVar = `${name}_FILE`
    const file = env[fileVar]
    delete out[fileVar]
    if (file === undefined || file === '') continue
    if (env[name] !== undefined && env[name] !== '') {
      problems.push({ variable: fileVar, message: `set either ${name} or ${fileVar}, not both` })
      continue
    }
    try {
      // One trailing newline is what `echo secret > file` adds; it is not part of the secret.
      out[name] = readFileSync(file, 'utf8').replace(/\r?\n$/, '')
    } catch (err) {
      problems.push({ variable: fileVar, message: `cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? 'error'})` })
    }
  }
  // An empty variable means "unset", as in most shells' and compose files' intent.
  for (const [k, v] of Object.entries(out)) if (v === '') delete out[k]
  return out
}

interface AjvError { instancePath: string, message?: string, params: Record<string, unknown> }

function schemaProblems (err: unknown): Problem[] {
  const errors = (err as { errors?: AjvError[] }).errors ?? []
  return errors.map(e => ({
    variable: e.instancePath.replace(/^\//, '') || String(e.params['missingProperty'] ?? 'environment'),
    // ajv messages describe the rule ("must be integer"), never the offending value.
    message: e.message ?? 'is invalid'
  }))
}

function isCidr (text: string): boolean {
  const [addr, bits, ...rest] = text.split('/')
  if (addr === undefined || rest.length > 0) return false
  const max = isIPv4(addr) ? 32 : isIPv6(addr) ? 128 : -1
  if (max < 0) return false
  if (bits === undefined) return true
  return /^\d+$/.test(bits) && Number(bits) <= max
}

// The URL carries the Redis password, so problems describe its shape, never its text.
function redisUrlProblems (text: string): Problem[] {
  let url: URL
  try {
    url = new URL(text)
  } catch {
    return [{ variable: 'REDIS_URL', message: 'is not a valid URL (redis://[:password@]host[:port][/db] or rediss:// for TLS)' }]
  }
  if (url.protocol !== 'redis:' && url.protocol !== 'rediss:') return [{ variable: 'REDIS_URL', message: 'must start with redis:// or rediss://' }]
  if (url.hostname === '') return [{ variable: 'REDIS_URL', message: 'names no host' }]
  if (!/^(\/\d*)?$/.test(url.pathname)) return [{ variable: 'REDIS_URL', message: 'path must be a database number, like /0' }]
  return []
}

// CORS_ORIGINS: what a browser sends in `Origin` (RFC 6454 §6.2: scheme://host[:port],
// lower-case, default port omitted), so matching is an exact string comparison.
function parseOrigins (text: string, production: boolean, problems: Problem[]): string[] {
  const origins: string[] = []
  for (const item of text.split(',').map(s => s.trim()).filter(s => s !== '')) {
    if (item === '*' || item === 'null') {
      // Fetch §3.2.5: credentialed responses cannot use `*`; a wildcard or the opaque
      // `null` origin would hand every site the workstation's client certificate.
      problems.push({ variable: 'CORS_ORIGINS', message: `'${item}' is not allowed: list each frontend origin (credentials are used)` })
      continue
    }
    let url: URL | undefined
    try { url = new URL(item) } catch {}
    if (url === undefined || !/^https?:\/\/[^/?#@]+\/?$/i.test(item) || (url.protocol !== 'https:' && url.protocol !== 'http:')) {
      problems.push({ variable: 'CORS_ORIGINS', message: `'${item}' is not an origin (scheme://host[:port], no path)` })
      continue
    }
    // A page served over plain http can be rewritten in transit, and would then use the
    // workstation's certificate with the attacker's script.
    if (production && url.protocol === 'http:' && !['localhost', '127.0.0.1', '[::1]'].includes(url.hostname)) {
      problems.push({ variable: 'CORS_ORIGINS', message: `'${item}' must be https:// in production` })
      continue
    }
    origins.push(url.origin)
  }
  return origins
}

function decodeKek (text: string): Buffer | undefined {
  if (!/^[A-Za-z0-9+/_-]+={0,2}$/.test(text)) return undefined
  const key = Buffer.from(text, 'base64')
  return key.length === 32 ? key : undefined
}

type Raw = Record<string, string | number | undefined>

export function loadConfig (env: Env, options: LoadOptions = {}): Config {
  const needs = new Set(options.needs ?? [])
  const problems: Problem[] = []
  const dotenv = options.dotenvPath === undefined || options.dotenvPath === false ? {} : readDotenv(resolve(options.dotenvPath))
  const merged: Env = { ...options.defaults, ...dotenv, ...env }
  const resolved = resolveFileSecrets(merged, problems)

  let raw: Raw
  try {
    raw = envSchema({ schema: structuredClone(schema) as unknown as Record<string, unknown>, data: resolved, env: false, dotenv: false }) as Raw
  } catch (err) {
    problems.push(...schemaProblems(err))
    // Keep going with what parsed so one message lists every problem, not just the first.
    raw = Object.fromEntries(Object.entries(resolved).filter(([k]) => k in schema.properties)) as Raw
  }
  const str = (k: string): string | undefined => raw[k] === undefined ? undefined : String(raw[k])
  const num = (k: keyof typeof schema.properties): number => {
    const v = Number(raw[k] ?? (schema.properties[k] as { default?: unknown }).default)
    return Number.isFinite(v) ? v : 0
  }
  const nodeEnv = (str('NODE_ENV') ?? 'development') as NodeEnv
  const production = nodeEnv === 'production'

  const requireVar = (need: Need, variable: string, why?: string): void => {
    if (needs.has(need) && str(variable) === undefined) {
      problems.push({ variable, message: why ?? 'is required' })
    }
  }
  if (production) requireVar('database', 'DATABASE_URL', 'is required when NODE_ENV=production (the embedded Postgres is for development only)')
  requireVar('clientCa', 'TLS_CLIENT_CA_FILE')
  requireVar('serverTls', 'TLS_CERT_FILE')
  requireVar('serverTls', 'TLS_KEY_FILE')
  requireVar('upstream', 'EHR_UPSTREAM_URL')

  let upstreamUrl: URL | undefined
  const upstreamRaw = str('EHR_UPSTREAM_URL')
  if (upstreamRaw !== undefined) {
    try {
      upstreamUrl = new URL(upstreamRaw)
      if (upstreamUrl.username !== '' || upstreamUrl.password !== '' || upstreamUrl.search !== '' || upstreamUrl.hash !== '') {
        problems.push({ variable: 'EHR_UPSTREAM_URL', message: 'must not contain credentials, a query or a fragment (use EHR_API_KEY)' })
      }
      // The upstream credentials travel with every request; in production only over TLS,
      // or to a sidecar on this host.
      if (production && upstreamUrl.protocol === 'http:' && !['localhost', '127.0.0.1', '[::1]'].includes(upstreamUrl.hostname)) {
        problems.push({ variable: 'EHR_UPSTREAM_URL', message: 'must be https:// in production (plain http only to localhost)' })
      }
    } catch {
      problems.push({ variable: 'EHR_UPSTREAM_URL', message: 'is not a valid URL' })
    }
  }

  const tokenSource = parseUpstreamAuth(str, production, problems)

  const publicUrlRaw = str('GATEWAY_PUBLIC_URL')
  if (publicUrlRaw !== undefined) {
    let ok = false
    try {
      const u = new URL(publicUrlRaw)
      ok = u.username === '' && u.password === '' && u.search === '' && u.hash === '' && !publicUrlRaw.includes('?') && !publicUrlRaw.includes('#')
    } catch {}
    if (!ok) problems.push({ variable: 'GATEWAY_PUBLIC_URL', message: 'must be an http(s) URL without credentials, query or fragment, like https://ehr-gateway.hospital.internal' })
  }

  const trustedProxies = (str('TRUSTED_PROXIES') ?? '').split(',').map(s => s.trim()).filter(s => s !== '')
  const badCidrs = trustedProxies.filter(c => !isCidr(c))
  if (badCidrs.length > 0) {
    problems.push({ variable: 'TRUSTED_PROXIES', message: `not IP addresses or CIDRs: ${badCidrs.join(', ')}` })
  }

  const windowMs = parseDuration(str('RATE_LIMIT_WINDOW') ?? '1 minute')
  if (windowMs === undefined || windowMs < 1000) {
    problems.push({ variable: 'RATE_LIMIT_WINDOW', message: "must be a duration of at least 1 second, like '1 minute' or '30s'" })
  }

  const redisUrl = str('REDIS_URL')
  if (redisUrl !== undefined) problems.push(...redisUrlProblems(redisUrl))
  const corsOrigins = parseOrigins(str('CORS_ORIGINS') ?? '', production, problems)

  let kek: Secret | undefined
  const kekRaw = str('TOKEN_KEY_ENCRYPTION_KEY')
  if (kekRaw !== undefined) {
    if (decodeKek(kekRaw) === undefined) {
      problems.push({ variable: 'TOKEN_KEY_ENCRYPTION_KEY', message: 'must be 32 random bytes in base64 (openssl rand -base64 32)' })
    } else {
      kek = new Secret(kekRaw)
    }
  } else if (needs.has('tokenKeys')) {
    if (production || options.devKeyEncryptionKey === undefined) {
      problems.push({ variable: 'TOKEN_KEY_ENCRYPTION_KEY', message: 'is required (openssl rand -base64 32)' })
    } else {
      kek = new Secret(options.devKeyEncryptionKey())
    }
  }

  // Every instance must issue and accept the same iss/aud; a name derived from each
  // host's own name would differ between instances behind one load balancer.
  if (production && needs.has('tokenKeys') && str('TOKEN_ISSUER') === undefined && ['0.0.0.0', '::', '[::]'].includes(str('GATEWAY_HOST') ?? '0.0.0.0')) {
    problems.push({ variable: 'TOKEN_ISSUER', message: 'is required in production when GATEWAY_HOST is a wildcard: the public https URL clients use' })
  }

  const workersRaw = (str('GATEWAY_WORKERS') ?? '1').trim().toLowerCase()
  const workers = workersRaw === 'auto' ? availableParallelism() : /^[1-9][0-9]*$/.test(workersRaw) ? Number(workersRaw) : 0
  if (workers < 1 || (workersRaw !== 'auto' && workers > MAX_WORKERS)) {
    problems.push({ variable: 'GATEWAY_WORKERS', message: `must be a whole number from 1 to ${MAX_WORKERS}, or auto (one per core)` })
  }

  if (problems.length > 0) throw new ConfigError(problems)

  const gatewayHost = str('GATEWAY_HOST') ?? '0.0.0.0'
  const gatewayPort = num('GATEWAY_PORT')
  const proxyPrefix = str('PROXY_PREFIX') ?? '/fhir'
  // "Derived from the listener": a wildcard bind address names no host, so use ours.
  const publicHost = ['0.0.0.0', '::', '[::]'].includes(gatewayHost) ? hostname() : gatewayHost
  const issuer = str('TOKEN_ISSUER') ?? `https://${publicHost}:${gatewayPort}`
  const databaseUrl = str('DATABASE_URL')
  const bool = (k: string): boolean => ['true', '1'].includes(str(k) ?? 'false')
  const apiKey = str('EHR_API_KEY')

  const config: Config = {
    nodeEnv,
    database: {
      url: databaseUrl === undefined ? undefined : new Secret(databaseUrl, maskUrlPassword(databaseUrl)),
      poolMax: num('DATABASE_POOL_MAX')
    },
    gateway: {
      host: gatewayHost,
      port: gatewayPort,
      trustedProxies,
      forwardedCertHeader: str('FORWARDED_CERT_HEADER') === 'x-ssl-client-cert' ? 'x-ssl-client-cert' : 'x-forwarded-client-cert',
      bodyLimitBytes: num('BODY_LIMIT_BYTES'),
      shutdownGraceMs: num('SHUTDOWN_GRACE_MS'),
      publicUrl: baseUrl(str('GATEWAY_PUBLIC_URL') ?? issuer),
      workers
    },
    ops: { host: str('OPS_HOST') ?? '127.0.0.1', port: num('OPS_PORT') },
    tls: {
      certFile: str('TLS_CERT_FILE'),
      keyFile: str('TLS_KEY_FILE'),
      clientCaFile: str('TLS_CLIENT_CA_FILE')
    },
    upstream: {
      url: upstreamUrl,
      proxyPrefix,
      apiKey: apiKey === undefined ? undefined : new Secret(apiKey),
      apiKeyHeader: (str('EHR_API_KEY_HEADER') ?? 'x-api-key').toLowerCase(),
      connections: num('UPSTREAM_CONNECTIONS'),
      connectTimeoutMs: num('UPSTREAM_CONNECT_TIMEOUT_MS'),
      headersTimeoutMs: num('UPSTREAM_HEADERS_TIMEOUT_MS'),
      bodyTimeoutMs: num('UPSTREAM_BODY_TIMEOUT_MS'),
      tokenSource,
      authTimeoutMs: num('UPSTREAM_AUTH_TIMEOUT_MS')
    },
    tokens: {
      issuer,
      audience: str('TOKEN_AUDIENCE') ?? `${issuer}${proxyPrefix}`,
      ttlSeconds: num('TOKEN_TTL_SECONDS'),
      alg: (str('TOKEN_ALG') ?? 'EdDSA') as 'EdDSA' | 'ES256',
      clockToleranceSeconds: num('TOKEN_CLOCK_TOLERANCE_SECONDS'),
      keyEncryptionKey: kek,
      requireDpop: bool('TOKEN_REQUIRE_DPOP'),
      singleUse: bool('TOKEN_SINGLE_USE'),
      encrypt: bool('TOKEN_ENCRYPT')
    },
    dpop: { maxAgeSeconds: num('DPOP_MAX_AGE_SECONDS'), nonce: bool('DPOP_NONCE') },
    registry: { cacheTtlMs: num('REGISTRY_CACHE_TTL_MS') },
    rateLimit: {
      max: num('RATE_LIMIT_MAX'),
      windowMs: windowMs ?? 60_000,
      redisUrl: redisUrl === undefined ? undefined : new Secret(redisUrl, maskUrlPassword(redisUrl)),
      fallbackMax: raw['RATE_LIMIT_FALLBACK_MAX'] === undefined ? num('RATE_LIMIT_MAX') : num('RATE_LIMIT_FALLBACK_MAX')
    },
    cors: { origins: corsOrigins },
    audit: {
      bufferMax: num('AUDIT_BUFFER_MAX'),
      batchSize: num('AUDIT_BATCH_SIZE'),
      flushIntervalMs: num('AUDIT_FLUSH_INTERVAL_MS'),
      closeTimeoutMs: num('AUDIT_CLOSE_TIMEOUT_MS')
    },
    log: { level: str('LOG_LEVEL') ?? 'info' }
  }
  return deepFreeze(config)
}

export function loadGatewayConfig (env: Env, options: Omit<LoadOptions, 'needs'> = {}): GatewayConfig {
  // Safe: GATEWAY_NEEDS makes loadConfig throw unless every narrowed field is present.
  return loadConfig(env, { ...options, needs: GATEWAY_NEEDS }) as GatewayConfig
}

export function keyEncryptionKeyBytes (secret: Secret): Buffer {
  const key = decodeKek(secret.reveal())
  /* c8 ignore next */
  if (key === undefined) throw new Error('TOKEN_KEY_ENCRYPTION_KEY was validated at load')
  return key
}

// Origin (lower-case, default port dropped) plus the path without its trailing slash.
function baseUrl (text: string): string {
  try {
    const url = new URL(text)
    return url.origin + url.pathname.replace(/\/+$/, '')
  } catch {
    return text.replace(/\/+$/, '')
  }
}

function deepFreeze<T> (value: T): T {
  if (value !== null && typeof value === 'object' && !(value instanceof Secret) && !(value instanceof URL)) {
    for (const v of Object.values(value)) deepFreeze(v)
    Object.freeze(value)
  }
  return value
}
