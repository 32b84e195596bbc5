import type { FastifyCorsOptions } from '@fastify/cors'
import type { FastifyRequest } from 'fastify'

// What a frontend on another origin needs: its calls carry the token (Authorization, DPoP)
// and FHIR's conditional headers; it reads the challenges, nonce, limits and locations.
const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS']
const ALLOWED_HEADERS = [
  'authorization', 'dpop', 'content-type', 'accept', 'prefer',
  'if-match', 'if-none-match', 'if-modified-since', 'if-none-exist'
]
const EXPOSED_HEADERS = [
  'www-authenticate', 'dpop-nonce', 'retry-after',
  'x-ratelimit-limit', 'x-ratelimit-remaining', 'x-ratelimit-reset',
  'location', 'content-location', 'etag', 'last-modified', 'x-request-id'
]

// Credentialed CORS (Fetch §3.2) for an exact allow-list: a browser sends the workstation's
// client certificate only on credentialed requests, so `Access-Control-Allow-Origin` names
// the one origin and `Access-Control-Allow-Credentials: true` goes with it. Any other
// origin gets no CORS header at all. A preflight (OPTIONS with
// Access-Control-Request-Method) is answered 204 in the onRequest hook, before any
// certificate, token or rate-limit check — browsers send no credentials on it — and never
// reaches the EHR; an OPTIONS without that header is an ordinary request and goes on.
export function corsDelegator (origins: readonly string[]) {
  const allowed = new Set(origins)
  const base = {
    credentials: true,
    methods: METHODS,
    allowedHeaders: ALLOWED_HEADERS,
    exposedHeaders: EXPOSED_HEADERS,
    maxAge: 600,
    strictPreflight: false
  } as const satisfies FastifyCorsOptions
  const refused: FastifyCorsOptions = { origin: false }
  return (request: FastifyRequest, done: (error: Error | null, options?: FastifyCorsOptions) => void): void => {
    const origin = request.headers.origin
    if (origin === undefined || !allowed.has(origin)) {
      done(null, refused)
      return
    }
    const preflight = request.method !== 'OPTIONS' || request.headers['access-control-request-method'] !== undefined
    done(null, { ...base, origin, preflight })
  }
}
