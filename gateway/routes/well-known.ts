import type { FastifyInstance } from 'fastify'
import type { Config } from '../../shared/config.js'
import { DPOP_ALGS } from '../dpop.js'
import type { SigningKeys } from '../signing-keys.js'

// Public by design: relying parties fetch keys and metadata without a client certificate.
export async function wellKnownRoutes (app: FastifyInstance, options: { keys: SigningKeys, config: Config }): Promise<void> {
  const { keys, config } = options
  app.get('/.well-known/jwks.json', { config: { rateLimit: false } }, async (_request, reply) => {
    reply.header('cache-control', 'public, max-age=60')
    return keys.jwks()
  })

  // RFC 8414 §2; RFC 8705 §3.3 for the certificate-bound token parameter, RFC 9449 §5.1 for
  // the DPoP algorithms. Endpoints are named by the public URL clients reach them at.
  app.get('/.well-known/oauth-authorization-server', { config: { rateLimit: false } }, async (_request, reply) => {
    reply.header('cache-control', 'public, max-age=300')
    const base = config.gateway.publicUrl
    return {
      issuer: config.tokens.issuer,
      token_endpoint: `${base}/v1/token`,
      jwks_uri: `${base}/.well-known/jwks.json`,
      grant_types_supported: ['client_credentials'],
      response_types_supported: [],
      token_endpoint_auth_methods_supported: ['tls_client_auth'],
      tls_client_certificate_bound_access_tokens: true,
      dpop_signing_alg_values_supported: [...DPOP_ALGS]
    }
  })
}
