import type { FastifyInstance } from 'fastify'
import type { Config } from '../../shared/config.js'
import type { SigningKeys } from '../signing-keys.js'

// Public by design: relying parties fetch keys and metadata without a client certificate.
export async function wellKnownRoutes (app: FastifyInstance, options: { keys: SigningKeys, config: Config }): Promise<void> {
  const { keys, config } = options
  app.get('/.well-known/jwks.json', { config: { rateLimit: false } }, async (_request, reply) => {
    reply.header('cache-control', 'public, max-age=60')
    return keys.jwks()
  })

  // RFC 8414 §2; RFC 8705 §3.3 for the certificate-bound token parameter.
  app.get('/.well-known/oauth-authorization-server', { config: { rateLimit: false } }, async (_request, reply) => {
    reply.header('cache-control', 'public, max-age=300')
    const issuer = config.tokens.issuer
    return {
      issuer,
      token_endpoint: `${issuer}/v1/token`,
      jwks_uri: `${issuer}/.well-known/jwks.json`,
      grant_types_supported: ['client_credentials'],
      response_types_supported: [],
      token_endpoint_auth_methods_supported: ['tls_client_auth'],
      tls_client_certificate_bound_access_tokens: true
    }
  })
}
