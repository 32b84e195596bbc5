import type { X509Certificate } from 'node:crypto'
import { STATUS_CODES } from 'node:http'
import type { Server as TlsServer } from 'node:tls'
import cors from '@fastify/cors'
import rateLimit from '@fastify/rate-limit'
import Fastify, { LogController } from 'fastify'
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Sql } from 'postgres'
import type { GatewayConfig } from '../shared/config.js'
import { keyEncryptionKeyBytes } from '../shared/config.js'
import { parseCaBundle } from '../shared/certificates.js'
import { GatewayError, errorSpecs, toProblem } from '../shared/errors.js'
import { createUpstreamCredentials } from '../shared/upstream-auth.js'
import type { ErrorCode } from '../shared/errors.js'
import { auditRepository } from '../shared/db/audit.js'
import { AuditTrail, registerAudit } from './audit.js'
import type { AuditSink } from './audit.js'
import { corsDelegator } from './cors.js'
import { DpopNonces } from './dpop.js'
import { rateLimitKey, resolveForwardedPeer } from './identity.js'
import { createMetrics } from './metrics.js'
import type { Metrics, MetricSources } from './metrics.js'
import { Possession } from './possession.js'
import { MachineRegistry } from './registry.js'
import { ReplayStore } from './replay.js'
import { requestId } from './request-id.js'
import { proxyRoutes } from './routes/proxy.js'
import type { StampHeaders } from './routes/proxy.js'
import { isOAuthFormRequest, oauthError, tokenRoutes } from './routes/token.js'
import { wellKnownRoutes } from './routes/well-known.js'
import { SECURITY_HEADERS } from './security-headers.js'
import { SharedLimits } from './shared-limits.js'
import { SigningKeys } from './signing-keys.js'
import { readTlsMaterial, tlsOptions } from './tls.js'
import type { GatewayTlsOptions, TlsMaterial } from './tls.js'
import { TlsReloader } from './tls-reload.js'
import { TokenService, tokenEncryptionKey } from './tokens.js'
import type { UpstreamDispatcher } from './upstream.js'

export interface GatewayDeps {
  readonly sql: Sql
  readonly upstream: UpstreamDispatcher
  // Milliseconds since the epoch; tests move time instead of waiting for it.
  readonly clock?: () => number
  // Where pino writes (stdout when absent); anything with pino's DestinationStream shape.
  readonly logStream?: { write (line: string): unknown }
  // Fixed TLS options instead of the configured files (then nothing is reloaded).
  readonly tls?: GatewayTlsOptions
  // The gateway writes its own audit trail to `sql`; only a benchmark measuring what that
  // costs passes another sink (there is no setting that turns auditing off).
  readonly audit?: AuditSink
}

export interface GatewayParts {
  readonly registry: MachineRegistry
  readonly keys: SigningKeys
  readonly tokens: TokenService
  readonly possession: Possession
  readonly replay: ReplayStore
  readonly metrics: Metrics
  readonly audit: AuditSink
  // Reloads the TLS files (on file changes and SIGHUP); null with fixed deps.tls options.
  readonly tls: TlsReloader | null
}

declare module 'fastify' {
  interface FastifyInstance {
    gateway: GatewayParts
  }
  interface FastifyRequest {
    errorCode: ErrorCode | null
    errorReason: string | null
  }
}

// STYLE §7: credentials never reach the log, whichever object carries them.
export function redactPaths (apiKeyHeader: string): string[] {
  return [
    'req.headers.authorization', 'req.headers.cookie', 'req.headers.dpop',
    `req.headers["${apiKeyHeader}"]`, 'res.headers["set-cookie"]',
    'access_token', '*.access_token', 'token', '*.token', 'apiKey', '*.apiKey'
  ]
}

// Query values can be patient data (`Patient?name=…`); logs keep only the parameter names.
export function withoutQueryValues (url: string): string {
  const q = url.indexOf('?')
  if (q === -1) return url
  const names = url.slice(q + 1).split('&').map(p => p.split('=')[0]).filter(n => n !== '')
  return url.slice(0, q) + (names.length === 0 ? '' : '?' + names.map(n => `${n}=`).join('&'))
}

// The answers Fastify gives before any hook runs carry the security headers too.
const PRE_ROUTING_HEADERS = SECURITY_HEADERS

// Malformed HTTP (bad framing, oversized headers, a request that took too long) never
// becomes a request; answer it on the socket as a problem, then close it.
function clientErrorResponse (err: NodeJS.ErrnoException): string {
  const code: ErrorCode = err.code === 'HPE_HEADER_OVERFLOW' ? 'HEADERS_TOO_LARGE'
    : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 'REQUEST_TIMEOUT'
      : 'BAD_REQUEST'
  const problem = JSON.stringify(toProblem(new GatewayError(code, ['malformed HTTP request'])))
  const headers = Object.entries(PRE_ROUTING_HEADERS).map(([k, v]) => `${k}: ${v}\r\n`).join('')
  return `HTTP/1.1 ${errorSpecs[code].status} ${STATUS_CODES[errorSpecs[code].status] ?? ''}\r\n` +
    `content-type: application/problem+json\r\ncontent-length: ${Buffer.byteLength(problem)}\r\nconnection: close\r\n${headers}\r\n${problem}`
}

function toGatewayError (err: FastifyError | GatewayError | Error, request: FastifyRequest): GatewayError {
  if (err instanceof GatewayError) return err
  const fe = err as FastifyError
  const status = fe.statusCode ?? 500
  if (fe.code === 'FST_ERR_CTP_BODY_TOO_LARGE') return new GatewayError('BODY_TOO_LARGE', [request.routeOptions.bodyLimit], { cause: err })
  if (fe.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') return new GatewayError('UNSUPPORTED_MEDIA_TYPE', [], { cause: err })
  if (status >= 400 && status < 500) return new GatewayError('BAD_REQUEST', ['the request body or headers are malformed'], { cause: err })
  return new GatewayError('INTERNAL_ERROR', [], { cause: err })
}

// Refusing a body we stopped reading: close the connection after answering, or the unread
// rest would keep the socket (and a graceful shutdown) waiting.
const UNREAD_BODY: ReadonlySet<ErrorCode> = new Set(['BODY_TOO_LARGE'])

function sendProblem (err: GatewayError, request: FastifyRequest, reply: FastifyReply): FastifyReply {
  request.errorCode = err.code
  request.errorReason = err.message
  if (UNREAD_BODY.has(err.code)) reply.header('connection', 'close')
  // The token endpoint's answers are OAuth errors too (RFC 6749 §5.2), problem fields kept.
  const oauth = request.routeOptions.config?.oauthErrors === true
  return reply
    .header('x-request-id', request.id) // here too: frameworkErrors answers skip onSend
    .code(err.statusCode)
    .headers(err.headers)
    .type(oauth && isOAuthFormRequest(request) ? 'application/json' : 'application/problem+json')
    .send(oauth ? { ...oauthError(err), ...toProblem(err, request.id) } : toProblem(err, request.id))
}

// The CAs forwarded client certificates are checked against: the reloader's current ones,
// or (fixed deps.tls) the given bundle, parsed once when first needed.
function caBundle (reloader: TlsReloader | null, parse: () => X509Certificate[]): () => readonly X509Certificate[] {
  if (reloader !== null) return () => reloader.clientCas
  let parsed: X509Certificate[] | undefined
  return () => (parsed ??= parse())
}

// The gateway as a Fastify instance that never listens by itself (STYLE §1): gateway/server.ts
// owns the process, tests listen on port 0.
export async function buildGateway (config: GatewayConfig, deps: GatewayDeps): Promise<FastifyInstance> {
  const clock = deps.clock ?? Date.now
  const material: TlsMaterial | undefined = deps.tls === undefined ? readTlsMaterial(config.tls) : undefined
  const tls = deps.tls ?? tlsOptions(material as TlsMaterial)
  const app = Fastify({
    https: tls,
    trustProxy: config.gateway.trustedProxies.length > 0 ? [...config.gateway.trustedProxies] : false,
    bodyLimit: config.gateway.bodyLimitBytes,
    requestTimeout: 120_000,
    // One access-log line per request (onResponse below) instead of Fastify's two.
    logController: new LogController({ disableRequestLogging: true }),
    routerOptions: { maxParamLength: 1000 },
    genReqId: () => requestId(),
    // A client-chosen request id would let it forge correlation in our logs.
    requestIdHeader: false,
    // URLs the router cannot even decode never reach hooks (the security headers' included) or the error
    // handler; answer them as problems with the baseline security headers here.
    frameworkErrors: (err, request, reply) => {
      void sendProblem(new GatewayError('PATH_INVALID', [], { cause: err, headers: PRE_ROUTING_HEADERS }), request, reply)
    },
    clientErrorHandler: (err: NodeJS.ErrnoException, socket) => {
      if (err.code === 'ECONNRESET' || socket.destroyed) return
      if (socket.writable) socket.write(clientErrorResponse(err))
      socket.destroy()
    },
    // While draining, requests on kept-alive connections are still served (with
    // `Connection: close`, below) rather than refused with Fastify's plain 503.
    return503OnClosing: false,
    logger: {
      level: config.log.level,
      redact: { paths: redactPaths(config.upstream.apiKeyHeader), censor: '[redacted]' },
      serializers: {
        req: (req: FastifyRequest) => ({ method: req.method, url: withoutQueryValues(req.url), remoteAddress: req.ip })
      },
      ...(deps.logStream === undefined ? {} : { stream: deps.logStream })
    }
  })

  const metricSources: MetricSources = {}
  const metrics = createMetrics(metricSources)
  metricSources.upstreamPool = () => deps.upstream.stats
  let reloader: TlsReloader | null = null
  if (material !== undefined) {
    const expiry = (m: TlsMaterial): void => { metrics.tlsCertificateExpiry.set(Date.parse(m.serverCert.validTo) / 1000) }
    expiry(material)
    reloader = new TlsReloader({
      files: config.tls,
      initial: material,
      log: app.log,
      onResult: (result, current) => { metrics.tlsReloads.labels(result).inc(); expiry(current) }
    })
    reloader.attach(app.server as unknown as TlsServer)
    reloader.watch()
  }
  const registry = new MachineRegistry(deps.sql, { ttlMs: config.registry.cacheTtlMs, now: clock })
  const keys = new SigningKeys(deps.sql, {
    kek: keyEncryptionKeyBytes(config.tokens.keyEncryptionKey),
    tokens: config.tokens,
    now: clock,
    onReloadError: err => { app.log.error({ err }, 'reloading signing keys failed; retrying') }
  })
  const replay = new ReplayStore(deps.sql, {
    now: clock,
    onCleanupError: err => { app.log.error({ err }, 'deleting expired replay entries failed; retrying on the next tick') }
  })
  const stopListening = async (): Promise<void> => {
    reloader?.close()
    replay.close()
    await registry.close()
    await keys.close()
  }
  try {
    await registry.listen()
    await keys.start()
  } catch (err) {
    // A half-built gateway must not keep LISTEN connections open behind the caller's back.
    await stopListening()
    await app.close()
    throw err
  }
  const trail = deps.audit === undefined
    ? new AuditTrail(auditRepository(deps.sql).insertBatch, { ...config.audit, log: app.log, metrics })
    : undefined
  const audit = deps.audit ?? trail as AuditTrail
  if (trail !== undefined) {
    trail.start()
    metricSources.auditDepth = () => trail.depth
  }
  // onClose runs once the listener has drained, so every answered request is in the buffer;
  // server.ts closes the database only after this.
  app.addHook('onClose', async () => {
    await trail?.close()
    await stopListening()
  })
  replay.startCleanup()
  const kek = keyEncryptionKeyBytes(config.tokens.keyEncryptionKey)
  const tokens = new TokenService(keys, config.tokens, clock, tokenEncryptionKey(kek))
  const possession = new Possession(config, replay, config.dpop.nonce ? new DpopNonces(kek, clock) : undefined, clock)
  app.decorate('gateway', { registry, keys, tokens, possession, replay, metrics, audit, tls: reloader })
  app.decorateRequest('machine', null)
  app.decorateRequest('certThumbprint', null)
  app.decorateRequest('tokenId', null)
  app.decorateRequest('forwardedPeer', null)
  app.decorateRequest('errorCode', null)
  app.decorateRequest('errorReason', null)

  app.setErrorHandler((err: FastifyError | GatewayError, request, reply) => {
    const gw = toGatewayError(err, request)
    // Refusals are in the access log with their code and reason; faults also get the cause.
    if (gw.statusCode >= 500) request.log.error({ err, code: gw.code }, gw.message)
    return sendProblem(gw, request, reply)
  })
  app.setNotFoundHandler((request, reply) => sendProblem(new GatewayError('NOT_FOUND', [request.method, withoutQueryValues(request.url)]), request, reply))

  let draining = false
  app.addHook('preClose', async () => { draining = true })
  // What the gateway puts on every answer, errors included: HSTS and the rest of the API
  // security headers, the request id, and, while draining, `Connection: close` (clients on
  // kept-alive connections reconnect, to an instance that stays). Set last, so no upstream
  // header of the same name survives. Answers Fastify sends get them in onSend; the proxy
  // writes its streamed answers itself and stamps them with the same function.
  const stampHeaders: StampHeaders = (headers, requestId) => {
    Object.assign(headers, SECURITY_HEADERS)
    headers['x-request-id'] = requestId
    if (draining) headers['connection'] = 'close'
  }
  // Callback-style hooks: an async hook costs a promise per request on the hot path.
  app.addHook('onSend', (request, reply, payload, done) => {
    const headers: Record<string, string> = {}
    stampHeaders(headers, request.id)
    reply.headers(headers)
    done(null, payload)
  })
  // The access line holds only fields picked here (the method, the path without query
  // values, the peer address, status, timing, machine, jti, refusal code and reason), never
  // headers or bodies, so none of the redaction paths can match it; pino's redaction clones
  // every logged object to look (~6 µs an access line in the bench, a tenth of the gateway's
  // own per-request CPU). Every other log call keeps it. The line is the same as
  // request.log's: reqId comes first, where the request logger puts its binding.
  const accessLog = app.log.child({}, { redact: { paths: [] } })
  // One access line and one count per request: from onResponse, or, for an audited request
  // that ended without it (Fastify skips onResponse for a client that left and for an answer
  // cut off mid-body), from the audit hooks.
  const logRequest = (request: FastifyRequest, status: number, elapsedMs: number): void => {
    const route = request.routeOptions.url ?? 'unmatched'
    metrics.requests.labels(route, request.method, String(status), request.errorCode ?? '').inc()
    metrics.duration.labels(route).observe(elapsedMs / 1000)
    accessLog.info({
      reqId: request.id,
      req: request,
      status,
      ms: Math.round(elapsedMs * 100) / 100,
      machine: request.machine?.name,
      jti: request.tokenId ?? undefined,
      code: request.errorCode ?? undefined,
      reason: request.errorReason ?? undefined
    }, 'request')
  }
  app.addHook('onResponse', (request, reply, done) => {
    logRequest(request, reply.statusCode, reply.elapsedTime)
    done()
  })

  // Before CORS and the rate limit: a spoofed client-certificate header is refused first,
  // and the limit counts the forwarded machine, not the proxy.
  app.addHook('onRequest', resolveForwardedPeer({
    trustedProxies: config.gateway.trustedProxies,
    certHeader: config.gateway.forwardedCertHeader,
    caBundle: caBundle(reloader, () => parseCaBundle(tls.ca.toString('utf8'), config.tls.clientCaFile)),
    now: clock
  }))
  // No CORS_ORIGINS, no CORS: same-origin frontends need none. Helmet's
  // Cross-Origin-Resource-Policy: same-origin stays: Fetch applies it to no-cors requests
  // only, so it does not block CORS reads by the allowed origins, and keeps <img>/<script>
  // embedding by every other site out.
  if (config.cors.origins.length > 0) await app.register(cors, { delegator: corsDelegator(config.cors.origins) })
  // One budget per machine certificate across the token endpoint and every proxied route
  // (route-level limits would each get a store of their own and multiply the allowance).
  // It runs first, before the registry and token checks, so failed attempts count too.
  const sharedLimits = config.rateLimit.redisUrl === undefined
    ? undefined
    : new SharedLimits({ url: config.rateLimit.redisUrl, now: clock, log: app.log, metrics })
  if (sharedLimits !== undefined) app.addHook('onClose', async () => { await sharedLimits.close() })
  const { max, fallbackMax } = config.rateLimit
  await app.register(rateLimit, {
    global: true,
    ...(sharedLimits === undefined
      ? { max }
      : { max: () => sharedLimits.shared ? max : fallbackMax, store: sharedLimits.storeClass() }),
    timeWindow: config.rateLimit.windowMs,
    hook: 'onRequest',
    keyGenerator: rateLimitKey,
    errorResponseBuilder: (_request, context) => new GatewayError('RATE_LIMITED', [Math.ceil(context.ttl / 1000)])
  })

  const auditHooks = registerAudit(app, audit, { proxyPrefix: config.upstream.proxyPrefix, clock, logEndedEarly: logRequest })
  await app.register(wellKnownRoutes, { keys, config })
  await app.register(tokenRoutes, { registry, tokens, possession, metrics, audit: auditHooks })
  const credentials = createUpstreamCredentials(config.upstream, {
    clock,
    log: app.log,
    onFetch: (mode, result) => { metrics.upstreamTokenFetches.labels(mode, result).inc() }
  })
  await app.register(proxyRoutes, { config, registry, tokens, possession, upstream: deps.upstream, metrics, credentials, audit: auditHooks, stampHeaders })
  return app
}
