import type { FastifyInstance } from 'fastify'
import type { Machine } from '../../shared/db/machines.js'
import { GatewayError } from '../../shared/errors.js'
import { identify } from '../identity.js'
import type { Metrics } from '../metrics.js'
import type { MachineRegistry } from '../registry.js'
import type { TokenService } from '../tokens.js'

interface TokenRouteOptions {
  readonly registry: MachineRegistry
  readonly tokens: TokenService
  readonly metrics: Metrics
}

// POST /v1/token: the machine authenticates with its certificate alone (RFC 8705
// tls_client_auth). An empty body is the frontend's call; a form-encoded
// grant_type=client_credentials request (RFC 6749 §4.4) is what OAuth libraries send.
export async function tokenRoutes (app: FastifyInstance, options: TokenRouteOptions): Promise<void> {
  const { registry, tokens, metrics } = options
  app.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'string', bodyLimit: 4096 }, (_request, body, done) => {
    done(null, Object.fromEntries(new URLSearchParams(body as string)))
  })

  app.post('/v1/token', {
    bodyLimit: 4096,
    preValidation: identify(registry)
  }, async (request, reply) => {
    const machine = request.machine as Machine
    const form = (request.body ?? {}) as Record<string, unknown>
    if (typeof form !== 'object' || Array.isArray(form)) throw new GatewayError('BAD_REQUEST', ['the body must be empty, a JSON object or a form'])
    const grantType = form['grant_type']
    if (grantType !== undefined && grantType !== 'client_credentials') {
      throw new GatewayError('BAD_REQUEST', ['grant_type must be client_credentials'])
    }
    const clientId = form['client_id']
    if (clientId !== undefined && clientId !== machine.name) {
      throw new GatewayError('BAD_REQUEST', ['client_id does not match the client certificate'])
    }
    const issued = await tokens.issue(machine, request.certThumbprint as string, request.ip)
    metrics.tokensIssued.inc()
    request.tokenId = issued.claims.jti
    // RFC 6749 §5.1: token responses must not be cached.
    reply.header('cache-control', 'no-store').header('pragma', 'no-cache')
    return {
      access_token: issued.token,
      token_type: 'Bearer',
      expires_in: issued.claims.exp - issued.claims.iat
    }
  })
}
