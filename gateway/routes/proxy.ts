import { Readable } from 'node:stream'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Dispatcher } from 'undici'
import type { GatewayConfig } from '../../shared/config.js'
import { GatewayError } from '../../shared/errors.js'
import { identify, requireToken } from '../identity.js'
import type { Metrics } from '../metrics.js'
import type { MachineRegistry } from '../registry.js'
import type { TokenService } from '../tokens.js'
import { clientResponseHeaders, limitBody, translateUpstreamError, upstreamPath, upstreamRequestHeaders } from '../upstream.js'
import type { UpstreamDispatcher } from '../upstream.js'

interface ProxyRouteOptions {
  readonly config: GatewayConfig
  readonly registry: MachineRegistry
  readonly tokens: TokenService
  readonly upstream: UpstreamDispatcher
  readonly metrics: Metrics
}

const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const

// `<PROXY_PREFIX>/*` → EHR_UPSTREAM_URL (request path step 5).
export async function proxyRoutes (app: FastifyInstance, options: ProxyRouteOptions): Promise<void> {
  const { config, upstream, metrics } = options
  const { proxyPrefix, apiKeyHeader, headersTimeoutMs, bodyTimeoutMs } = config.upstream
  const basePath = config.upstream.url.pathname
  const apiKey = config.upstream.apiKey?.reveal()
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

    // A client that goes away must not leave a request running against the EHR.
    const abort = new AbortController()
    const onClose = (): void => { if (!reply.raw.writableFinished) abort.abort() }
    reply.raw.once('close', onClose)

    const started = performance.now()
    let response: Dispatcher.ResponseData
    try {
      response = await upstream.request({
        method: request.method as (typeof METHODS)[number],
        path,
        headers: upstreamRequestHeaders(request.headers, apiKeyHeader, apiKey, request.id),
        body: hasBody ? Readable.from(limitBody(request.raw, bodyLimit), { objectMode: false }) : null,
        headersTimeout: headersTimeoutMs,
        bodyTimeout: bodyTimeoutMs,
        signal: abort.signal
      })
    } catch (err) {
      reply.raw.off('close', onClose)
      // Our own abort: the client left, the EHR did nothing wrong.
      if (abort.signal.aborted) throw new GatewayError('CLIENT_CLOSED_REQUEST', [], { cause: err })
      throw translateUpstreamError(err, false)
    }
    metrics.upstreamDuration.observe({ status: String(response.statusCode) }, (performance.now() - started) / 1000)
    // The upstream only ever sees the gateway's credentials, so its 401/407 is our
    // misconfiguration: passing it on would send the frontend fetching new tokens forever.
    if (response.statusCode === 401 || response.statusCode === 407 || response.statusCode < 100 || response.statusCode > 599) {
      // Read and drop the (small) body so the pooled connection is reused, not torn down.
      await response.body.dump().catch(() => {})
      reply.raw.off('close', onClose)
      request.log.warn({ upstreamStatus: response.statusCode }, 'upstream refused the gateway or answered nonsense')
      throw new GatewayError(response.statusCode < 100 || response.statusCode > 599 ? 'UPSTREAM_ERROR' : 'UPSTREAM_AUTH_FAILED')
    }
    response.body.once('error', err => {
      if (abort.signal.aborted) request.log.info('client closed the request during the response')
      else request.log.warn({ err: translateUpstreamError(err, true) }, 'upstream response body failed')
    })
    reply.code(response.statusCode).headers(clientResponseHeaders(response.headers, rewrite, name => reply.hasHeader(name)))
    await reply.send(response.body)
  }

  const routeOptions = { preValidation: [identify(options.registry), requireToken(options.tokens)] }
  app.route({ method: [...METHODS], url: proxyPrefix, ...routeOptions, handler: forward })
  app.route({ method: [...METHODS], url: `${proxyPrefix}/*`, ...routeOptions, handler: forward })
}
