import type { IncomingHttpHeaders } from 'node:http'
import type { Readable } from 'node:stream'
import { Pool } from 'undici'
import type { Dispatcher } from 'undici'
import type { GatewayConfig } from '../shared/config.js'
import type { PoolStats } from './metrics.js'
import { GatewayError } from '../shared/errors.js'

export function createUpstreamPool (config: GatewayConfig): Pool {
  return new Pool(config.upstream.url.origin, {
    connections: config.upstream.connections,
    keepAliveTimeout: 30_000,
    connect: { timeout: config.upstream.connectTimeoutMs },
    headersTimeout: config.upstream.headersTimeoutMs,
    bodyTimeout: config.upstream.bodyTimeoutMs
  })
}

// RFC 9110 §7.6.1 hop-by-hop headers, plus what must never cross the gateway: the
// client's own credentials (the upstream gets ours), proof headers, and headers by which a
// client could pose as a proxy or steer the upstream (method overrides, original-URL and
// forwarded identity, a Google quota project billed to our credentials).
const REQUEST_DROP = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'proxy-authorization',
  'te', 'trailer', 'transfer-encoding', 'upgrade', 'host', 'expect',
  'authorization', 'cookie', 'dpop',
  'x-forwarded-client-cert', 'x-ssl-client-cert', 'x-client-cert', 'ssl-client-cert',
  'client-cert', 'client-cert-chain', // RFC 9440
  'forwarded', 'x-real-ip', 'true-client-ip', 'x-client-ip', 'x-cluster-client-ip', 'x-request-id',
  'x-http-method-override', 'x-http-method', 'x-method-override', 'x-rewrite-url'
])
const REQUEST_DROP_PREFIXES = ['x-forwarded-', 'x-original-', 'x-envoy-', 'x-goog-', 'x-ssl-', 'cf-']

// Hop-by-hop again, and upstream headers that mean nothing for the gateway's origin or
// name the EHR's internals: its auth challenges (the client authenticates to us), cookies,
// server software and tracing.
const RESPONSE_DROP = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'te', 'trailer',
  'transfer-encoding', 'upgrade',
  'www-authenticate', 'set-cookie', 'server', 'x-powered-by', 'via', 'alt-svc',
  'x-cloud-trace-context', 'x-envoy-upstream-service-time',
  // The gateway's own protocol: its DPoP nonces, not the EHR's.
  'dpop-nonce'
])
// CORS is the gateway's policy for its own origin (CORS_ORIGINS): an EHR's
// Access-Control-* headers would open it to origins nobody configured.
const RESPONSE_DROP_PREFIXES = ['access-control-']

function dropped (name: string, names: ReadonlySet<string>, prefixes: readonly string[]): boolean {
  if (names.has(name)) return true
  for (const prefix of prefixes) if (name.startsWith(prefix)) return true
  return false
}

// Header names a `Connection` header lists are hop-by-hop for this message too (§7.6.1).
// Nearly every message says just `keep-alive` (dropped anyway) or `close`: those need no
// set built per message.
const LISTS_CLOSE: ReadonlySet<string> = new Set(['close'])
function connectionListed (value: string | string[] | undefined): ReadonlySet<string> | undefined {
  if (value === undefined) return undefined
  if (typeof value === 'string' && value.length <= 10) {
    const lower = value.toLowerCase()
    if (lower === 'keep-alive') return undefined
    if (lower === 'close') return LISTS_CLOSE
  }
  const names = (Array.isArray(value) ? value.join(',') : value).split(',')
  return new Set(names.map(n => n.trim().toLowerCase()).filter(n => n !== ''))
}

// `credentials`: the gateway's own headers (API key, Authorization, quota project), from
// shared/upstream-auth.ts; a client header of the same name never passes.
export function upstreamRequestHeaders (incoming: IncomingHttpHeaders, apiKeyHeader: string, credentials: Readonly<Record<string, string>>, requestId: string): Record<string, string | string[]> {
  const listed = connectionListed(incoming.connection)
  const out: Record<string, string | string[]> = {}
  for (const name in incoming) {
    const value = incoming[name]
    if (value === undefined || dropped(name, REQUEST_DROP, REQUEST_DROP_PREFIXES) || name === apiKeyHeader || name in credentials || listed?.has(name) === true) continue
    out[name] = value
  }
  for (const name in credentials) out[name] = credentials[name] as string
  out['x-request-id'] = requestId
  return out
}

export interface ResponseRewrite {
  // EHR_UPSTREAM_URL without a trailing slash, and its path; both map to the proxy prefix.
  readonly upstreamBase: string
  readonly upstreamBasePath: string
  readonly proxyPrefix: string
}

// Like nginx's default `proxy_redirect`: a Location pointing into the upstream becomes the
// same resource under our prefix, so the frontend can follow it and the EHR's internal
// address never reaches it.
function rewriteLocation (value: string, rewrite: ResponseRewrite): string {
  if (value.startsWith(rewrite.upstreamBase + '/') || value === rewrite.upstreamBase) {
    return rewrite.proxyPrefix + value.slice(rewrite.upstreamBase.length)
  }
  if (rewrite.upstreamBasePath !== '' && value.startsWith(rewrite.upstreamBasePath + '/')) {
    return rewrite.proxyPrefix + value.slice(rewrite.upstreamBasePath.length)
  }
  return value
}

// `ours` says which headers the gateway has set already (helmet's security headers): the
// upstream cannot weaken those for the gateway's origin.
export function clientResponseHeaders (upstream: IncomingHttpHeaders, rewrite: ResponseRewrite, ours: (name: string) => boolean): Record<string, string | string[]> {
  const listed = connectionListed(upstream.connection)
  const out: Record<string, string | string[]> = {}
  for (const name in upstream) {
    const value = upstream[name]
    if (value === undefined || dropped(name, RESPONSE_DROP, RESPONSE_DROP_PREFIXES) || listed?.has(name) === true || ours(name)) continue
    out[name] = (name === 'location' || name === 'content-location') && typeof value === 'string'
      ? rewriteLocation(value, rewrite)
      : value
  }
  return out
}

// Maps `/fhir/Patient/1?x=y` to `<base>/Patient/1?x=y`, or undefined when the path could
// escape the upstream base path or mean different things to different parsers: dot
// segments (also percent-encoded), encoded `/` or `\`, empty segments (`//host` tricks),
// control characters, or invalid percent-encoding. The path is forwarded still encoded,
// exactly as the client sent it, so the upstream sees what we checked.
export function upstreamPath (rawUrl: string, prefix: string, basePath: string): string | undefined {
  const q = rawUrl.indexOf('?')
  const clientPath = q === -1 ? rawUrl : rawUrl.slice(0, q)
  const query = q === -1 ? '' : rawUrl.slice(q)
  if (!clientPath.startsWith(prefix)) return undefined
  const rest = clientPath.slice(prefix.length)
  if (rest !== '' && !rest.startsWith('/')) return undefined
  if (/[\u0000-\u001f\u007f\\#]/.test(rawUrl)) return undefined
  const segments = rest.split('/').slice(1)
  for (let i = 0; i < segments.length; i++) {
    const segment = segments[i] as string
    if (segment === '') {
      if (i === segments.length - 1) continue // a trailing slash is harmless
      return undefined
    }
    let decoded = segment
    if (segment.includes('%')) {
      try {
        decoded = decodeURIComponent(segment)
      } catch {
        return undefined
      }
    }
    // Servlet containers (Tomcat, Jetty: where HAPI FHIR runs) drop `;params` before
    // resolving dot segments, so `..;x` is `..` to them.
    const semicolon = decoded.indexOf(';')
    const bare = semicolon === -1 ? decoded : decoded.slice(0, semicolon)
    if (bare === '.' || bare === '..' || /[/\\\u0000-\u001f\u007f]/.test(decoded)) return undefined
  }
  const path = basePath.replace(/\/+$/, '') + rest
  return (path.startsWith('/') ? path : '/' + path) + query
}

// The request body, streamed to the upstream, cut off with a 413 once it passes the limit
// (Content-Length is checked before we connect; this catches chunked bodies).
// `counter.bytesIn` is what the audit row records.
export async function * limitBody (body: Readable, limit: number, counter: { bytesIn: number } = { bytesIn: 0 }): AsyncGenerator<Buffer> {
  let seen = 0
  for await (const chunk of body) {
    seen += (chunk as Buffer).length
    counter.bytesIn = seen
    if (seen > limit) throw new GatewayError('BODY_TOO_LARGE', [limit])
    yield chunk as Buffer
  }
}

const CONNECT_CODES = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'ECONNRESET'])
const TIMEOUT_CODES = new Set(['UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'UND_ERR_CONNECT_TIMEOUT', 'ETIMEDOUT'])

// STYLE §3: undici's failures become our codes; the cause stays for the log, never the
// client (it would name internal hosts and ports).
export function translateUpstreamError (err: unknown, responded: boolean): GatewayError {
  if (err instanceof GatewayError) return err
  const cause = (err as { cause?: unknown }).cause
  if (cause instanceof GatewayError) return cause
  const code = (err as { code?: string }).code ?? ''
  if (TIMEOUT_CODES.has(code)) return new GatewayError('UPSTREAM_TIMEOUT', [], { cause: err })
  if (!responded && CONNECT_CODES.has(code)) return new GatewayError('UPSTREAM_UNAVAILABLE', [], { cause: err })
  return new GatewayError('UPSTREAM_ERROR', [], { cause: err })
}

// A Pool's `stats` feed the upstream connection gauges when the dispatcher has them.
export type UpstreamDispatcher = Pick<Dispatcher, 'dispatch'> & { readonly stats?: PoolStats }
