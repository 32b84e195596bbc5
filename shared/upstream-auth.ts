import { createPrivateKey, createPublicKey, randomUUID } from 'node:crypto'
import { JWT, OAuth2Client, gaxios } from 'google-auth-library'
import { SignJWT, calculateJwkThumbprint, exportJWK } from 'jose'
import { request } from 'undici'
import type { Config } from './config.js'
import { GatewayError } from './errors.js'
import { UPSTREAM_AUTH_MODES } from './upstream-auth-config.js'
import type { GoogleOAuthConfig, GoogleServiceAccountConfig, SmartConfig, UpstreamTokenSourceConfig } from './upstream-auth-config.js'

// How the gateway authenticates to the EHR (issue 4): a static API key, a token source,
// or both. The proxy asks `headers()` per request; the token behind it is cached here,
// refreshed ahead of expiry, fetched once however many requests wait, and each fetch is
// bounded so a hanging token endpoint cannot pile requests up.

export type TokenSourceMode = UpstreamTokenSourceConfig['mode']

export interface FetchedToken {
  readonly accessToken: string
  // undefined: the endpoint did not say (RFC 6749 §5.1 makes expires_in only RECOMMENDED)
  readonly expiresInMs: number | undefined
}

// One token request, no caching: the three upstream protocols.
export interface TokenSource {
  readonly mode: TokenSourceMode
  fetch (signal: AbortSignal): Promise<FetchedToken>
}

export interface UpstreamAuthHeaders {
  readonly headers: Readonly<Record<string, string>>
  // The access token in `headers`, to name it when the upstream refuses it.
  readonly token: string | undefined
}

export interface UpstreamCredentials {
  // 'none', 'api-key', a token source mode, or '<mode>+api-key'
  readonly mode: string
  readonly description: string
  // A refused token can be replaced (a 401 is worth one retry).
  readonly refreshable: boolean
  // `rejected`: the token the upstream just refused; a fresh one is fetched unless another
  // request has replaced it already.
  headers (rejected?: string): Promise<UpstreamAuthHeaders>
  // One token fetch, bypassing the cache; for `ehrctl config check --probe`.
  probe (): Promise<{ readonly expiresAt: Date } | undefined>
}

export interface UpstreamAuthHooks {
  readonly clock?: () => number
  readonly log?: {
    info (obj: Record<string, unknown>, msg: string): void
    warn (obj: Record<string, unknown>, msg: string): void
  }
  readonly onFetch?: (mode: TokenSourceMode, result: 'ok' | 'error') => void
}

// A token endpoint failure, described without anything secret: the library errors carry
// the request (client secret, refresh token, signed assertion) and the response (the
// token), so they are never logged or kept as a cause.
export class TokenFetchError extends Error {
  readonly status: number | undefined
  readonly oauthError: string | undefined
  constructor (message: string, status?: number, oauthError?: string) {
    super(message)
    this.name = 'TokenFetchError'
    this.status = status
    this.oauthError = oauthError
  }
}

const SAFE_WORD = /^[A-Za-z0-9_.-]{1,64}$/
const safe = (v: unknown): string | undefined => typeof v === 'string' && SAFE_WORD.test(v) ? v : undefined

function describeFailure (err: unknown, timedOut: boolean, timeoutMs: number): TokenFetchError {
  if (err instanceof TokenFetchError) return err
  if (timedOut) return new TokenFetchError(`token endpoint did not answer within ${timeoutMs} ms`)
  const e = err as { response?: { status?: number, data?: unknown }, code?: unknown, cause?: { code?: unknown } }
  const status = typeof e.response?.status === 'number' ? e.response.status : undefined
  if (status !== undefined) {
    const data = e.response?.data
    const oauthError = data !== null && typeof data === 'object' ? safe((data as Record<string, unknown>)['error']) : undefined
    return new TokenFetchError(`token endpoint answered ${status}${oauthError === undefined ? '' : ' ' + oauthError}`, status, oauthError)
  }
  const code = safe(e.code) ?? safe(e.cause?.code)
  return new TokenFetchError(`token endpoint unreachable${code === undefined ? '' : ` (${code})`}`)
}

// ---- Google: google-auth-library's OAuth2Client (refresh grant) and JWT (RFC 7523 bearer)

const GOOGLE_TOKEN_URL = 'https://oauth2.googleapis.com/token'
// The library refreshes only when its credentials are within this much of expiry; our
// cache decides when to ask, so every ask must be a real fetch.
const ALWAYS_REFRESH = Number.MAX_SAFE_INTEGER

// The library's own transport with its retries off (our cache backs off instead, so a
// dead endpoint is not hit three times per attempt) and its per-request timeout on. The
// service-account grant posts to a hard-coded Google URL whatever the key file's token_uri
// says; GOOGLE_TOKEN_URL redirects it here (Private Service Connect). The assertion's `aud`
// stays Google's URL, as Google checks it behind a private endpoint too (the Java and Python
// libraries do the same: google-auth-library-java#809, google-auth-library-python#784).
function googleTransport (tokenUrl: URL | undefined, timeoutMs: number): gaxios.Gaxios {
  const transporter = new gaxios.Gaxios({ timeout: timeoutMs, retry: false, retryConfig: { retry: 0 } })
  if (tokenUrl !== undefined) {
    transporter.interceptors.request.add({
      resolved: async options => {
        if (options.url.href === GOOGLE_TOKEN_URL) options.url = new URL(tokenUrl.href)
        return options
      }
    })
  }
  return transporter
}

function lifetime (expiryDate: number | null | undefined): number | undefined {
  // expiry_date is the library's own Date.now() plus expires_in; turned back into a
  // lifetime so our cache runs on the injected clock. expires_in is whole seconds (RFC 6749
  // §5.1), so rounding takes out the milliseconds spent since the library read the clock.
  return typeof expiryDate === 'number' ? Math.round((expiryDate - Date.now()) / 1000) * 1000 : undefined
}

function googleOAuthSource (config: GoogleOAuthConfig, timeoutMs: number): TokenSource {
  const client = new OAuth2Client({
    clientId: config.clientId,
    clientSecret: config.clientSecret.reveal(),
    ...(config.redirectUri === undefined ? {} : { redirectUri: config.redirectUri }),
    ...(config.tokenUrl === undefined ? {} : { endpoints: { oauth2TokenUrl: config.tokenUrl.href } }),
    eagerRefreshThresholdMillis: ALWAYS_REFRESH,
    transporter: googleTransport(undefined, timeoutMs)
  })
  return {
    mode: 'google-oauth',
    async fetch () {
      // Only the refresh token: without an access token the library always refreshes.
      client.setCredentials({ refresh_token: config.refreshToken.reveal() })
      const { token } = await client.getAccessToken()
      if (typeof token !== 'string' || token === '') throw new TokenFetchError('token endpoint answered without an access_token')
      return { accessToken: token, expiresInMs: lifetime(client.credentials.expiry_date) }
    }
  }
}

function googleServiceAccountSource (config: GoogleServiceAccountConfig, timeoutMs: number): TokenSource {
  const client = new JWT({
    email: config.clientEmail,
    key: config.privateKey.reveal(),
    ...(config.privateKeyId === undefined ? {} : { keyId: config.privateKeyId }),
    scopes: [...config.scopes],
    eagerRefreshThresholdMillis: ALWAYS_REFRESH,
    transporter: googleTransport(config.tokenUrl, timeoutMs)
  })
  return {
    mode: 'google-service-account',
    async fetch () {
      const { token } = await client.getAccessToken()
      if (typeof token !== 'string' || token === '') throw new TokenFetchError('token endpoint answered without an access_token')
      return { accessToken: token, expiresInMs: lifetime(client.credentials.expiry_date) }
    }
  }
}

// ---- SMART Backend Services (client_credentials + private_key_jwt, jose)

const ASSERTION_TTL_S = 240

function smartSource (config: SmartConfig, clock: () => number): TokenSource {
  const key = createPrivateKey(config.privateKey.reveal())
  // SMART requires `kid` in the assertion header; without SMART_KEY_ID use the key's
  // RFC 7638 thumbprint, which is what `jwk-to-thumbprint` tools register by default.
  const kid = config.keyId !== undefined
    ? Promise.resolve(config.keyId)
    : exportJWK(createPublicKey(key)).then(async jwk => await calculateJwkThumbprint(jwk))
  return {
    mode: 'smart',
    async fetch (signal) {
      const now = Math.floor(clock() / 1000)
      // SMART Backend Services §"Authenticating to the token endpoint": iss = sub = client
      // id, aud = the token URL, exp at most five minutes ahead (a minute of margin for
      // the server's clock), a jti never used before.
      const assertion = await new SignJWT({})
        .setProtectedHeader({ alg: config.alg, kid: await kid, typ: 'JWT' })
        .setIssuer(config.clientId)
        .setSubject(config.clientId)
        .setAudience(config.tokenUrl.href)
        .setIssuedAt(now)
        .setExpirationTime(now + ASSERTION_TTL_S)
        .setJti(randomUUID())
        .sign(key)
      const form = new URLSearchParams({
        grant_type: 'client_credentials',
        client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
        client_assertion: assertion
      })
      if (config.scope !== undefined) form.set('scope', config.scope)
      const res = await request(config.tokenUrl, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' },
        body: form.toString(),
        signal
      })
      const text = await res.body.text()
      let json: Record<string, unknown> = {}
      try {
        const parsed: unknown = JSON.parse(text)
        if (parsed !== null && typeof parsed === 'object') json = parsed as Record<string, unknown>
      } catch {}
      if (res.statusCode !== 200) {
        const oauthError = safe(json['error'])
        throw new TokenFetchError(`token endpoint answered ${res.statusCode}${oauthError === undefined ? '' : ' ' + oauthError}`, res.statusCode, oauthError)
      }
      const token = json['access_token']
      // RFC 6749 §7.1: we can only present Bearer tokens (a DPoP-bound one would need proofs).
      if (typeof token !== 'string' || token === '' || String(json['token_type']).toLowerCase() !== 'bearer') {
        throw new TokenFetchError('token endpoint answered without a Bearer access_token')
      }
      const expiresIn = json['expires_in']
      return { accessToken: token, expiresInMs: typeof expiresIn === 'number' && expiresIn > 0 ? expiresIn * 1000 : undefined }
    }
  }
}

export function createTokenSource (config: UpstreamTokenSourceConfig, timeoutMs: number, clock: () => number): TokenSource {
  switch (config.mode) {
    case 'google-oauth': return googleOAuthSource(config, timeoutMs)
    case 'google-service-account': return googleServiceAccountSource(config, timeoutMs)
    case 'smart': return smartSource(config, clock)
  }
}

// ---- the cache in front of a source

// Refresh when less than max(60 s, 10 % of the lifetime) is left (but never sooner than
// half-way), so a token is replaced well before the upstream could refuse it.
const MIN_REFRESH_MARGIN_MS = 60_000
// When the endpoint does not say, assume Google's and most servers' hour.
const DEFAULT_LIFETIME_MS = 3_600_000
const MAX_LIFETIME_MS = 86_400_000
// After a failed fetch, wait before the next: 1 s, doubling to 30 s, reset on success.
const BACKOFF_MIN_MS = 1000
const BACKOFF_MAX_MS = 30_000

interface CachedToken {
  readonly value: string
  readonly expiresAt: number
  readonly refreshAt: number
  readonly usableUntil: number
}

class TokenCache {
  #current: CachedToken | undefined
  #inflight: Promise<CachedToken> | undefined
  #retryAt = 0
  #backoffMs = BACKOFF_MIN_MS
  readonly #source: TokenSource
  readonly #timeoutMs: number
  readonly #hooks: UpstreamAuthHooks
  readonly #clock: () => number

  constructor (source: TokenSource, timeoutMs: number, hooks: UpstreamAuthHooks) {
    this.#source = source
    this.#timeoutMs = timeoutMs
    this.#hooks = hooks
    this.#clock = hooks.clock ?? Date.now
  }

  async token (rejected?: string): Promise<string> {
    const now = this.#clock()
    let current = this.#current
    // The upstream refused this token: never send it again.
    if (rejected !== undefined && current?.value === rejected) {
      this.#current = current = undefined
    }
    if (current !== undefined && now < current.usableUntil) {
      // Still good: refresh in the background and keep using it meanwhile, also if that
      // refresh fails.
      if (now >= current.refreshAt && this.#inflight === undefined && now >= this.#retryAt) {
        this.#fetch().catch(() => {})
      }
      return current.value
    }
    if (this.#inflight !== undefined) return (await this.#inflight).value
    if (now < this.#retryAt) {
      throw new GatewayError('UPSTREAM_AUTH_FAILED', ['could not be obtained (token endpoint failing; retrying shortly)'])
    }
    return (await this.#fetch()).value
  }

  async fetchOnce (): Promise<CachedToken> {
    return await (this.#inflight ?? this.#fetch())
  }

  #fetch (): Promise<CachedToken> {
    const started = this.#clock()
    const abort = new AbortController()
    let timedOut = false
    let timer: NodeJS.Timeout | undefined
    const fetching = new Promise<FetchedToken>((resolve, reject) => {
      // Our own bound, whatever the library does with its timeout: waiting requests get
      // their 502 within UPSTREAM_AUTH_TIMEOUT_MS.
      timer = setTimeout(() => {
        timedOut = true
        abort.abort()
        reject(new TokenFetchError(`token endpoint did not answer within ${this.#timeoutMs} ms`))
      }, this.#timeoutMs)
      this.#source.fetch(abort.signal).then(resolve, reject)
    })
    const inflight = fetching.then(
      fetched => {
        const lifetimeMs = Math.min(MAX_LIFETIME_MS, fetched.expiresInMs !== undefined && fetched.expiresInMs >= 1000 ? fetched.expiresInMs : DEFAULT_LIFETIME_MS)
        const margin = Math.min(Math.max(MIN_REFRESH_MARGIN_MS, lifetimeMs / 10), lifetimeMs / 2)
        const expiresAt = started + lifetimeMs
        const token: CachedToken = {
          value: fetched.accessToken,
          expiresAt,
          refreshAt: expiresAt - margin,
          // A few seconds short of expiry: the request still has to reach the upstream.
          usableUntil: expiresAt - Math.min(5000, lifetimeMs / 10)
        }
        this.#current = token
        this.#backoffMs = BACKOFF_MIN_MS
        this.#retryAt = 0
        this.#hooks.onFetch?.(this.#source.mode, 'ok')
        this.#hooks.log?.info({ upstreamAuth: this.#source.mode, expiresInS: Math.round(lifetimeMs / 1000) }, 'upstream token fetched')
        return token
      },
      (err: unknown) => {
        const failure = describeFailure(err, timedOut, this.#timeoutMs)
        this.#retryAt = this.#clock() + this.#backoffMs
        this.#hooks.onFetch?.(this.#source.mode, 'error')
        this.#hooks.log?.warn({
          upstreamAuth: this.#source.mode,
          status: failure.status,
          oauthError: failure.oauthError,
          retryInMs: this.#backoffMs,
          reason: failure.message
        }, 'upstream token fetch failed')
        this.#backoffMs = Math.min(BACKOFF_MAX_MS, this.#backoffMs * 2)
        throw new GatewayError('UPSTREAM_AUTH_FAILED', ['could not be obtained'], { cause: failure })
      }
    ).finally(() => {
      clearTimeout(timer)
      this.#inflight = undefined
    })
    this.#inflight = inflight
    return inflight
  }
}

export function createUpstreamCredentials (upstream: Config['upstream'], hooks: UpstreamAuthHooks = {}): UpstreamCredentials {
  const apiKey: Record<string, string> = upstream.apiKey === undefined ? {} : { [upstream.apiKeyHeader]: upstream.apiKey.reveal() }
  const sourceConfig = upstream.tokenSource
  const withKey = upstream.apiKey === undefined ? '' : '+api-key'
  if (sourceConfig === undefined) {
    const fixed: UpstreamAuthHeaders = { headers: Object.freeze(apiKey), token: undefined }
    const mode = upstream.apiKey === undefined ? 'none' : 'api-key'
    return {
      mode,
      description: mode === 'none' ? 'none (the upstream gets no credentials)' : `static API key in ${upstream.apiKeyHeader}`,
      refreshable: false,
      headers: async () => fixed,
      probe: async () => undefined
    }
  }
  const clock = hooks.clock ?? Date.now
  const source = createTokenSource(sourceConfig, upstream.authTimeoutMs, clock)
  const cache = new TokenCache(source, upstream.authTimeoutMs, hooks)
  // The Cloud Healthcare API bills the project the credentials belong to unless told.
  const quota: Record<string, string> = sourceConfig.mode !== 'smart' && sourceConfig.quotaProject !== undefined
    ? { 'x-goog-user-project': sourceConfig.quotaProject }
    : {}
  let last: UpstreamAuthHeaders | undefined
  return {
    mode: sourceConfig.mode + withKey,
    description: UPSTREAM_AUTH_MODES[sourceConfig.mode] + (withKey === '' ? '' : `, plus static API key in ${upstream.apiKeyHeader}`),
    refreshable: true,
    async headers (rejected) {
      const token = await cache.token(rejected)
      // Built once per token, not per request (the hot path).
      if (last?.token !== token) last = { headers: Object.freeze({ ...apiKey, ...quota, authorization: `Bearer ${token}` }), token }
      return last
    },
    async probe () {
      const token = await cache.fetchOnce()
      return { expiresAt: new Date(token.expiresAt) }
    }
  }
}
