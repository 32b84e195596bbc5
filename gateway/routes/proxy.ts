import { EventEmitter } from 'node:events'
import { Readable } from 'node:stream'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Dispatcher } from 'undici'
import type { GatewayConfig } from '../../shared/config.js'
import { GatewayError } from '../../shared/errors.js'
import type { AuditHooks } from '../audit.js'
import { identify, requireToken } from '../identity.js'
import type { Metrics } from '../metrics.js'
import type { Possession } from '../possession.js'
import type { MachineRegistry } from '../registry.js'
import { SECURITY_HEADER_NAMES } from '../security-headers.js'
import type { TokenService } from '../tokens.js'
import type { UpstreamCredentials } from '../../shared/upstream-auth.js'
import { clientResponseHeaders, limitBody, translateUpstreamError, upstreamPath, upstreamRequestHeaders } from '../upstream.js'
import type { UpstreamDispatcher } from '../upstream.js'

interface ProxyRouteOptions {
  readonly config: GatewayConfig
  readonly registry: MachineRegistry
  readonly tokens: TokenService
  readonly possession: Possession
  readonly upstream: UpstreamDispatcher
  readonly metrics: Metrics
  readonly credentials: UpstreamCredentials
  readonly audit: AuditHooks
}

const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const
const RETRY_ON_401: ReadonlySet<string> = new Set(['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE'])

// `<PROXY_PREFIX>/*` → EHR_UPSTREAM_URL (request path step 5).
export async function proxyRoutes (app: FastifyInstance, options: ProxyRouteOptions): Promise<void> {
  const { config, upstream, metrics, credentials } = options
  const { proxyPrefix, apiKeyHeader, headersTimeoutMs, bodyTimeoutMs } = config.upstream
  const basePath = config.upstream.url.pathname
  const bodyLimit = config.gateway.bodyLimitBytes
  const upstreamBasePath = basePath.replace(/\/+$/, '')
  const rewrite = { upstreamBase: config.upstream.url.origin + upstreamBasePath, upstreamBasePath, proxyPrefix }

  // Bodies are streamed, never parsed: whatever the content type, leave the stream alone.
  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', (_request, _payload, done) => { done(null) })

  async function forward (request: FastifyRequest, reply: FastifyReply): Promise<void> {
    const path = upstreamPath(request.raw.url ?? '/', proxyPrefix, basePath)
    if (path === undefined) throw new GatewayError('PATH_INVALID')
    const length = request.headers['content-length']
    if (length !== undefined && Number(length) > bodyLimit) throw new GatewayError('BODY_TOO_LARGE', [bodyLimit])
    const hasBody = length !== undefined ? length !== '0' : request.headers['transfer-encoding'] !== undefined
    const method = request.method as (typeof METHODS)[number]
    let auth = await credentials.headers()

    // A client that goes away must not leave a request running against the EHR. undici
    // takes an EventEmitter as the signal: far cheaper per request than an AbortController,
    // whose AbortSignal is a full EventTarget.
    const abort = new EventEmitter()
    let aborted = false
    const onClose = (): void => {
      if (reply.raw.writableFinished) return
      aborted = true
      abort.emit('abort')
    }
    reply.raw.once('close', onClose)

    const send = async (): Promise<Dispatcher.ResponseData> => {
      const started = performance.now()
      const response = await upstream.request({
        method,
        path,
        headers: upstreamRequestHeaders(request.headers, apiKeyHeader, auth.headers, request.id),
        body: hasBody ? Readable.from(limitBody(request.raw, bodyLimit, request), { objectMode: false }) : null,
        headersTimeout: headersTimeoutMs,
        bodyTimeout: bodyTimeoutMs,
        signal: abort
      })
      // The audit row keeps the last attempt's time to headers.
      request.upstreamMs = performance.now() - started
      metrics.upstreamDuration.labels(String(response.statusCode)).observe(request.upstreamMs / 1000)
      return response
    }
    let response: Dispatcher.ResponseData
    try {
      response = await send()
      // A refused token (revoked, or expired early): one fresh token, one more try, only
      // where repeating the request cannot do anything twice (RFC 9110 §9.2.2) and there is
      // no streamed body we could not send again.
      if (response.statusCode === 401 && credentials.refreshable && !hasBody && RETRY_ON_401.has(method)) {
        await response.body.dump().catch(() => {})
        request.log.info({ upstreamStatus: 401 }, 'upstream refused the token; refreshing it and retrying once')
        auth = await credentials.headers(auth.token)
        response = await send()
      }
    } catch (err) {
      reply.raw.off('close', onClose)
      // Our own abort: the client left, the EHR did nothing wrong.
      if (aborted) throw new GatewayError('CLIENT_CLOSED_REQUEST', [], { cause: err })
      throw translateUpstreamError(err, false)
    }
    // The upstream only ever sees the gateway's credentials, so its 401/407 is our
    // misconfiguration: passing it on would send the frontend fetching new tokens forever.
    if (response.statusCode === 401 || response.statusCode === 407 || response.statusCode < 100 || response.statusCode > 599) {
      // Read and drop the (small) body so the pooled connection is reused, not torn down.
      await response.body.dump().catch(() => {})
      reply.raw.off('close', onClose)
      request.log.warn({ upstreamStatus: response.statusCode }, 'upstream refused the gateway or answered nonsense')
      throw response.statusCode < 100 || response.statusCode > 599
        ? new GatewayError('UPSTREAM_ERROR')
        : new GatewayError('UPSTREAM_AUTH_FAILED', ['were refused'])
    }
    response.body.once('error', err => {
      if (aborted) request.log.info('client closed the request during the response')
      else request.log.warn({ err: translateUpstreamError(err, true) }, 'upstream response body failed')
    })
    // The security headers are the gateway's (set in onSend): the upstream's never pass.
    reply.code(response.statusCode).headers(clientResponseHeaders(response.headers, rewrite, name => SECURITY_HEADER_NAMES.has(name) || reply.hasHeader(name)))
    await reply.send(response.body)
  }

  const { audit } = options
  const routeOptions = {
    onRequest: audit.onRequest,
    preValidation: [identify(options.registry), requireToken(options.tokens, options.possession)],
    onResponse: audit.onResponse,
    onRequestAbort: audit.onRequestAbort
  }
  app.route({ method: [...METHODS], url: proxyPrefix, ...routeOptions, handler: forward })
  app.route({ method: [...METHODS], url: `${proxyPrefix}/*`, ...routeOptions, handler: forward })
}
