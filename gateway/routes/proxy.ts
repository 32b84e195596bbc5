import type { IncomingHttpHeaders, ServerResponse } from 'node:http'
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
  readonly stampHeaders: StampHeaders
}

// sent: the upstream's answer went to the client (whole, or cut short by a failure);
// otherwise the status of an answer the gateway read, dropped and refuses to pass on.
type Outcome = { readonly sent: true } | { readonly sent: false, readonly status: number }
const SENT: Outcome = { sent: true }
const MAX_DROPPED_BODY = 128 * 1024
// setTimeout runs any longer delay after 1 ms; undici's bodyTimeout (its own timers) takes any
// UPSTREAM_BODY_TIMEOUT_MS, so the stall timer must not cut at once where undici would wait.
const MAX_TIMER_MS = 2 ** 31 - 1

// The headers the gateway adds to every answer (gateway/app.ts), for the answers the proxy
// writes itself.
export type StampHeaders = (headers: Record<string, string | number | string[]>, requestId: string) => void

const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const
const RETRY_ON_401: ReadonlySet<string> = new Set(['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE'])

// `<PROXY_PREFIX>/*` → EHR_UPSTREAM_URL (request path step 5).
export async function proxyRoutes (app: FastifyInstance, options: ProxyRouteOptions): Promise<void> {
  const { config, upstream, metrics, credentials, stampHeaders } = options
  const { proxyPrefix, apiKeyHeader, headersTimeoutMs, bodyTimeoutMs } = config.upstream
  const basePath = config.upstream.url.pathname
  const bodyLimit = config.gateway.bodyLimitBytes
  const stallMs = Math.min(bodyTimeoutMs, MAX_TIMER_MS)
  const upstreamBasePath = basePath.replace(/\/+$/, '')
  const rewrite = { upstreamBase: config.upstream.url.origin + upstreamBasePath, upstreamBasePath, proxyPrefix }

  // Bodies are streamed, never parsed: whatever the content type, leave the stream alone.
  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', (_request, _payload, done) => { done(null) })

  // The upstream's answer is streamed to the client as it arrives, written straight to the
  // raw response: undici's dispatch API and a hijacked reply skip the Readable stream
  // undici.request would build and Fastify's stream pipeline around it, a sixth of a proxied
  // request's CPU in the bench (onResponse hooks still run on a hijacked reply). Answers the
  // gateway refuses to pass on never reach the client; their bodies are read and dropped so
  // the pooled connection is reused.
  async function forward (request: FastifyRequest, reply: FastifyReply): Promise<void> {
    const path = upstreamPath(request.raw.url ?? '/', proxyPrefix, basePath)
    if (path === undefined) throw new GatewayError('PATH_INVALID')
    const length = request.headers['content-length']
    if (length !== undefined && Number(length) > bodyLimit) throw new GatewayError('BODY_TOO_LARGE', [bodyLimit])
    const hasBody = length !== undefined ? length !== '0' : request.headers['transfer-encoding'] !== undefined
    const method = request.method as (typeof METHODS)[number]
    // A client that goes away must not leave a request running against the EHR.
    let aborted = false
    let controller: Dispatcher.DispatchController | undefined
    const onClose = (): void => {
      if (reply.raw.writableFinished) return
      aborted = true
      controller?.abort(new Error('the client closed the request'))
    }
    reply.raw.once('close', onClose)
    // Gone before this handler ran (during the hooks): 'close' has fired already.
    if (reply.raw.destroyed) {
      reply.raw.off('close', onClose)
      throw new GatewayError('CLIENT_CLOSED_REQUEST')
    }
    let auth = await credentials.headers()

    // Headers go out once the upstream's arrive: from then on the answer is the client's,
    // and a failure can only cut it short.
    const commit = (statusCode: number, upstreamHeaders: IncomingHttpHeaders): ServerResponse => {
      reply.hijack()
      // What earlier hooks set (rate-limit, CORS, DPoP-Nonce) wins over the upstream's.
      const headers = reply.getHeaders() as Record<string, string | number | string[]>
      Object.assign(headers, clientResponseHeaders(upstreamHeaders, rewrite, name => SECURITY_HEADER_NAMES.has(name) || Object.hasOwn(headers, name)))
      stampHeaders(headers, request.id)
      reply.raw.writeHead(statusCode, headers)
      return reply.raw
    }

    const attempt = async (): Promise<Outcome> => await new Promise<Outcome>((resolve, reject) => {
      const started = performance.now()
      let res: ServerResponse | undefined
      let dropped = 0
      let droppedBytes = 0
      // undici suspends bodyTimeout while the body is paused for a client that does not read,
      // so nothing else would ever free the pooled connection: the body must move at least
      // every UPSTREAM_BODY_TIMEOUT_MS, whichever side stalls it (nginx's send_timeout). Armed
      // only on a pause, so answers that never fill the socket cost no timer.
      let stall: NodeJS.Timeout | undefined
      let stalled = false
      upstream.dispatch({
        method,
        path,
        headers: upstreamRequestHeaders(request.headers, apiKeyHeader, auth.headers, request.id),
        body: hasBody ? Readable.from(limitBody(request.raw, bodyLimit, request), { objectMode: false }) : null,
        headersTimeout: headersTimeoutMs,
        bodyTimeout: bodyTimeoutMs
      }, {
        onRequestStart (c) {
          controller = c
          if (aborted) c.abort(new Error('the client closed the request'))
        },
        onResponseStart (c, statusCode, headers) {
          if (statusCode >= 100 && statusCode < 200) return // informational: the final answer follows
          // The audit row keeps the last attempt's time to headers.
          request.upstreamMs = performance.now() - started
          metrics.upstreamDuration.labels(String(statusCode)).observe(request.upstreamMs / 1000)
          // The upstream only ever sees the gateway's credentials, so its 401/407 is our
          // misconfiguration: passing it on would send the frontend fetching new tokens forever.
          if (statusCode === 401 || statusCode === 407 || statusCode < 100 || statusCode > 599) {
            dropped = statusCode
            return
          }
          try {
            res = commit(statusCode, headers)
          } catch (err) {
            // Headers Node refuses to write (undici's parser lets none through today): the
            // reply is hijacked already, so cutting the connection is the only answer left.
            request.log.error({ err }, 'the upstream answer could not be written')
            reply.raw.destroy()
            resolve(SENT)
            c.abort(err as Error)
            return
          }
          res.on('drain', () => {
            clearTimeout(stall)
            stall = undefined
            c.resume()
          })
        },
        onResponseData (c, chunk) {
          if (res === undefined) {
            // A refused answer is read only so its connection can be reused, and no further
            // than undici's body.dump() would: past that the connection is not worth it.
            droppedBytes += chunk.length
            if (droppedBytes > MAX_DROPPED_BODY) c.abort(new Error('refused upstream answer too long to read'))
            return
          }
          if (res.write(chunk)) return
          // A destroyed response never drains: stop the upstream rather than wait for it.
          if (res.destroyed) {
            c.abort(new Error('the client closed the request'))
            return
          }
          c.pause()
          stall ??= setTimeout(() => {
            stalled = true
            request.errorCode = 'CLIENT_STOPPED_READING'
            c.abort(new Error('the client stopped reading'))
          }, stallMs).unref()
        },
        onResponseEnd () {
          clearTimeout(stall)
          if (res === undefined) {
            resolve({ sent: false, status: dropped })
            return
          }
          res.end()
          resolve(SENT)
        },
        onResponseError (_c, err) {
          clearTimeout(stall)
          if (res === undefined) {
            if (dropped !== 0) resolve({ sent: false, status: dropped })
            else reject(err)
            return
          }
          if (stalled) request.log.warn({ bodyTimeoutMs }, 'client stopped reading; response cut after UPSTREAM_BODY_TIMEOUT_MS')
          else if (aborted) request.log.info('client closed the request during the response')
          else {
            // The audit row (written on 'close') says the EHR broke the answer off, where it
            // would otherwise read as a client that left.
            const failure = translateUpstreamError(err, true)
            request.errorCode = failure.code
            request.log.warn({ err: failure }, 'upstream response body failed')
          }
          res.destroy()
          resolve(SENT)
        }
      })
    })

    let outcome: Outcome
    try {
      outcome = await attempt()
      // A refused token (revoked, or expired early): one fresh token, one more try, only
      // where repeating the request cannot do anything twice (RFC 9110 §9.2.2) and there is
      // no streamed body we could not send again.
      if (!outcome.sent && outcome.status === 401 && credentials.refreshable && !hasBody && RETRY_ON_401.has(method)) {
        request.log.info({ upstreamStatus: 401 }, 'upstream refused the token; refreshing it and retrying once')
        auth = await credentials.headers(auth.token)
        outcome = await attempt()
      }
    } catch (err) {
      reply.raw.off('close', onClose)
      // Our own abort: the client left, the EHR did nothing wrong.
      if (aborted) throw new GatewayError('CLIENT_CLOSED_REQUEST', [], { cause: err })
      throw translateUpstreamError(err, false)
    }
    if (!outcome.sent) {
      reply.raw.off('close', onClose)
      request.log.warn({ upstreamStatus: outcome.status }, 'upstream refused the gateway or answered nonsense')
      throw outcome.status === 401 || outcome.status === 407
        ? new GatewayError('UPSTREAM_AUTH_FAILED', ['were refused'])
        : new GatewayError('UPSTREAM_ERROR')
    }
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
