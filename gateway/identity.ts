import type { X509Certificate } from 'node:crypto'
import { isIP } from 'node:net'
import type { TLSSocket } from 'node:tls'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { certificateThumbprint } from '../shared/certificates.js'
import type { Machine } from '../shared/db/machines.js'
import { GatewayError } from '../shared/errors.js'
import { CERT_HEADERS, ForwardedCertificates, trustedPeers } from './forwarded.js'
import type { PeerVerdict } from './forwarded.js'
import type { Possession, Scheme } from './possession.js'
import type { MachineRegistry } from './registry.js'
import type { TokenService } from './tokens.js'
import { normaliseIp } from './tokens.js'

declare module 'fastify' {
  interface FastifyRequest {
    machine: Machine | null
    certThumbprint: string | null
    tokenId: string | null
    // The client certificate a trusted proxy forwarded; null: the TLS connection's own.
    forwardedPeer: PeerVerdict | null
  }
}

// The certificate does not change for the life of a TLS connection, so its verdict and
// fingerprint are computed once per socket, not per keep-alive request. Never for
// forwarded certificates: behind a proxy one connection carries many workstations.
const verdicts = new WeakMap<TLSSocket, PeerVerdict>()

function peerVerdict (request: FastifyRequest): PeerVerdict {
  return request.forwardedPeer ?? socketVerdict(request.raw.socket as TLSSocket)
}

function socketVerdict (socket: TLSSocket): PeerVerdict {
  let verdict = verdicts.get(socket)
  if (verdict === undefined) {
    const cert = typeof socket.getPeerX509Certificate === 'function' ? socket.getPeerX509Certificate() : undefined
    if (cert === undefined) {
      verdict = { error: new GatewayError('CLIENT_CERT_REQUIRED') }
    } else if (!socket.authorized) {
      // OpenSSL's reason, e.g. CERT_HAS_EXPIRED or UNABLE_TO_VERIFY_LEAF_SIGNATURE
      const reason = socket.authorizationError instanceof Error ? socket.authorizationError.message : String(socket.authorizationError)
      verdict = { error: new GatewayError('CLIENT_CERT_UNTRUSTED', [reason]) }
    } else {
      verdict = { thumbprint: certificateThumbprint(cert.raw) }
    }
    verdicts.set(socket, verdict)
  }
  return verdict
}

// The client CA bundle was reloaded without the CA this connection's certificate chains to
// (gateway/tls-reload.ts): its requests are refused from now on, like those of a machine
// revoked under an open connection, while the connection itself stays up.
export function distrustPeer (socket: TLSSocket, reason: string): void {
  verdicts.set(socket, { error: new GatewayError('CLIENT_CERT_UNTRUSTED', [reason]) })
}

// The rate-limit key: the client certificate's fingerprint when the handshake (or a trusted
// proxy's header) gave a verified one, else the client address. Cheap (cached per socket) and known before any database lookup,
// so refused requests count against the limit too.
export function rateLimitKey (request: FastifyRequest): string {
  const verdict = peerVerdict(request)
  return 'thumbprint' in verdict ? verdict.thumbprint : request.ip
}

// The fingerprint of the certificate the client presented and the CA verified, whether or
// not it is registered: the audit trail records who tried.
export function presentedThumbprint (request: FastifyRequest): string | null {
  const verdict = peerVerdict(request)
  return 'thumbprint' in verdict ? verdict.thumbprint : null
}

export interface ForwardedOptions {
  readonly trustedProxies: readonly string[]
  // Only this header is believed, even from a trusted proxy: a proxy sanitises the header it
  // sets, not the other one (Envoy's SANITIZE_SET passes a client's X-SSL-Client-Cert on).
  readonly certHeader: typeof CERT_HEADERS[number]
  // The client CAs of TLS_CLIENT_CA_FILE trusted now (asked per forwarded certificate, so a
  // reload applies); parsed only when there are trusted proxies.
  readonly caBundle: () => readonly X509Certificate[]
  readonly now: () => number
}

// onRequest hook, before the rate limit: which certificate is this request's? From a peer in
// TRUSTED_PROXIES, the one the FORWARDED_CERT_HEADER header names (and the client IP from
// X-Forwarded-For, which Fastify's trustProxy already resolves to the right-most untrusted
// hop); from anyone else, or the other header, it is a spoofing attempt, refused before any
// lookup.
export function resolveForwardedPeer (options: ForwardedOptions) {
  const trusted = trustedPeers(options.trustedProxies)
  const forwarded = options.trustedProxies.length === 0 ? undefined : new ForwardedCertificates(options.caBundle, options.now)
  // Callback-style: it runs on every request, and an async hook costs a promise each time.
  return function forwardedPeer (request: FastifyRequest, _reply: FastifyReply, done: (err?: Error) => void): void {
    try {
      checkForwarded(request)
    } catch (err) {
      done(err as Error)
      return
    }
    done()
  }

  function checkForwarded (request: FastifyRequest): void {
    const headers = request.headers
    let found: { name: typeof CERT_HEADERS[number], value: string } | undefined
    let fromProxy: boolean | undefined
    for (const name of CERT_HEADERS) {
      const raw = headers[name]
      if (raw === undefined) continue
      fromProxy ??= trusted(request.raw.socket.remoteAddress)
      if (!fromProxy || name !== options.certHeader) {
        request.log.warn({ header: name, remoteAddress: request.raw.socket.remoteAddress }, fromProxy ? 'client-certificate header the trusted proxy does not set refused' : 'client-certificate header from an untrusted peer refused')
        throw new GatewayError('FORWARDED_HEADER_UNTRUSTED', [name])
      }
      found = { name, value: Array.isArray(raw) ? raw.join(', ') : raw }
    }
    if (headers['x-forwarded-for'] !== undefined && isIP(request.ip) === 0 && trusted(request.raw.socket.remoteAddress)) {
      throw new GatewayError('FORWARDED_HEADER_INVALID', ['x-forwarded-for', 'not a list of IP addresses'])
    }
    // An empty value is a proxy saying "no client certificate": the TLS connection decides.
    if (found !== undefined && found.value !== '' && forwarded !== undefined) request.forwardedPeer = forwarded.verdict(found.name, found.value)
  }
}

// preValidation hook for routes that need a registered machine (request path step 2).
export function identify (registry: MachineRegistry) {
  return async function identifyMachine (request: FastifyRequest): Promise<void> {
    const verdict = peerVerdict(request)
    if ('error' in verdict) throw verdict.error
    const machine = await registry.lookup(verdict.thumbprint)
    if (machine === null) throw new GatewayError('MACHINE_NOT_REGISTERED')
    if (machine.revokedAt !== null) throw new GatewayError('MACHINE_REVOKED', [machine.name])
    request.machine = machine
    request.certThumbprint = verdict.thumbprint
  }
}

// RFC 6750 §2.1 / RFC 9449 §7.1: `<scheme> <token68>`, the scheme case-insensitive.
const AUTHORIZATION = /^(Bearer|DPoP) +([A-Za-z0-9._~+/-]+=*) *$/i

// preValidation hook after identify (request path step 3): a valid token of this gateway,
// issued to this machine's certificate, used from the address it was issued to, then
// proof of possession (DPoP) or single use as configured.
export function requireToken (tokens: TokenService, possession: Possession) {
  return async function verifyAccessToken (request: FastifyRequest, reply: FastifyReply): Promise<void> {
    possession.offerNonce(reply)
    const header = request.headers.authorization
    if (header === undefined) throw new GatewayError('TOKEN_MISSING', [], { headers: possession.challenge(undefined) })
    const match = AUTHORIZATION.exec(header)
    if (match === null) throw new GatewayError('TOKEN_MISSING', [], { headers: possession.challenge(undefined, 'TOKEN_MISSING') })
    const scheme: Scheme = (match[1] as string).toLowerCase() === 'dpop' ? 'DPoP' : 'Bearer'
    const token = match[2] as string
    let claims
    try {
      claims = await tokens.verify(token)
    } catch (err) {
      throw err instanceof GatewayError ? err.withHeaders(possession.challenge(scheme, err.code)) : err
    }
    const machine = request.machine as Machine
    if (claims.cnf['x5t#S256'] !== request.certThumbprint || claims.sub !== machine.id) {
      throw new GatewayError('TOKEN_WRONG_MACHINE', [], { headers: possession.challenge(scheme, 'TOKEN_WRONG_MACHINE') })
    }
    if (claims.ip !== normaliseIp(request.ip)) throw new GatewayError('TOKEN_WRONG_IP', [], { headers: possession.challenge(scheme, 'TOKEN_WRONG_IP') })
    request.tokenId = claims.jti
    await possession.checkResource(request, scheme, token, claims)
  }
}
