import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { Machine } from '../../shared/db/machines.js'
import { GatewayError } from '../../shared/errors.js'
import type { ErrorCode } from '../../shared/errors.js'
import type { AuditHooks } from '../audit.js'
import { identify } from '../identity.js'
import type { Metrics } from '../metrics.js'
import type { Possession } from '../possession.js'
import type { MachineRegistry } from '../registry.js'
import type { TokenService } from '../tokens.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    // Refusals also carry RFC 6749 §5.2 `error` / `error_description` (see oauthError).
    oauthErrors?: boolean
  }
}

interface TokenRouteOptions {
  readonly registry: MachineRegistry
  readonly tokens: TokenService
  readonly possession: Possession
  readonly metrics: Metrics
  readonly audit: AuditHooks
}

const INVALID_CLIENT: ReadonlySet<ErrorCode> = new Set([
  'CLIENT_ID_MISMATCH', 'CLIENT_CERT_REQUIRED', 'CLIENT_CERT_UNTRUSTED', 'MACHINE_NOT_REGISTERED', 'MACHINE_REVOKED'
])

// The OAuth error a token endpoint refusal stands for: RFC 6749 §5.2, RFC 9449 §5 and §8.
export function oauthError (err: GatewayError): { error: string, error_description: string } {
  const error = err.code === 'DPOP_NONCE_REQUIRED' ? 'use_dpop_nonce'
    : err.code.startsWith('DPOP_') ? 'invalid_dpop_proof'
      : INVALID_CLIENT.has(err.code) ? 'invalid_client'
        : err.code === 'GRANT_TYPE_UNSUPPORTED' ? 'unsupported_grant_type'
          : err.statusCode === 503 ? 'temporarily_unavailable'
            : err.statusCode >= 500 ? 'server_error'
              : 'invalid_request'
  return { error, error_description: err.message }
}

// A standard OAuth request (a form body) gets the media type OAuth libraries parse (RFC 6749
// §5.2: application/json); the gateway's own clients get problem+json like everywhere else.
export function isOAuthFormRequest (request: FastifyRequest): boolean {
  return request.headers['content-type']?.toLowerCase().startsWith('application/x-www-form-urlencoded') === true
}

// POST /v1/token: the machine authenticates with its certificate alone (RFC 8705
// tls_client_auth). An empty body is the frontend's call; a form-encoded
// grant_type=client_credentials request (RFC 6749 §4.4) is what OAuth libraries send. A DPoP
// proof (RFC 9449 §5) binds the token to the client's key as well.
export async function tokenRoutes (app: FastifyInstance, options: TokenRouteOptions): Promise<void> {
  const { registry, tokens, possession, metrics, audit } = options
  app.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'string', bodyLimit: 4096 }, (_request, body, done) => {
    done(null, Object.fromEntries(new URLSearchParams(body as string)))
  })

  app.post('/v1/token', {
    bodyLimit: 4096,
    config: { oauthErrors: true },
    onRequest: audit.onRequest,
    preValidation: identify(registry),
    onResponse: [audit.onResponse, async (request, reply) => {
      if (reply.statusCode !== 200) metrics.tokensRefused.labels(request.errorCode ?? String(reply.statusCode)).inc()
    }],
    onRequestAbort: audit.onRequestAbort
  }, async (request, reply) => {
    possession.offerNonce(reply)
    const machine = request.machine as Machine
    const form = (request.body ?? {}) as Record<string, unknown>
    if (typeof form !== 'object' || Array.isArray(form)) throw new GatewayError('BAD_REQUEST', ['the body must be empty, a JSON object or a form'])
    const grantType = form['grant_type']
    if (grantType !== undefined && grantType !== 'client_credentials') throw new GatewayError('GRANT_TYPE_UNSUPPORTED')
    const clientId = form['client_id']
    // RFC 8705 §2.1.2: with tls_client_auth the certificate authenticates; a client_id that
    // names another client is a failed client authentication.
    if (clientId !== undefined && clientId !== machine.name) throw new GatewayError('CLIENT_ID_MISMATCH')
    const jkt = await possession.tokenRequestKey(request)
    const issued = await tokens.issue(machine, request.certThumbprint as string, request.ip, jkt)
    metrics.tokensIssued.inc()
    request.tokenId = issued.claims.jti
    // RFC 6749 §5.1: token responses must not be cached.
    reply.header('cache-control', 'no-store').header('pragma', 'no-cache')
    return {
      access_token: issued.token,
      token_type: jkt === undefined ? 'Bearer' : 'DPoP',
      expires_in: issued.claims.exp - issued.claims.iat
    }
  })
}
