import type { IncomingMessage, ServerResponse } from 'node:http'
import helmet from 'helmet'

// helmet tuned for an API that serves JSON, never pages (OWASP REST Security Cheat Sheet,
// "Security headers"): a CSP that allows nothing, no framing, no referrer, HSTS; the
// headers that only matter to HTML documents in old browsers are left out, which also
// keeps every response ~400 bytes lighter.
export const HELMET_OPTIONS = {
  contentSecurityPolicy: { useDefaults: false, directives: { defaultSrc: ["'none'"], frameAncestors: ["'none'"] } },
  xFrameOptions: { action: 'deny' },
  strictTransportSecurity: { maxAge: 31_536_000, includeSubDomains: true },
  referrerPolicy: { policy: 'no-referrer' },
  originAgentCluster: false,
  xDnsPrefetchControl: false,
  xDownloadOptions: false,
  xPermittedCrossDomainPolicies: false,
  xXssProtection: false
} satisfies Parameters<typeof helmet>[0]

// The same headers as a plain object, computed by running helmet once. @fastify/helmet would
// rebuild helmet's middleware chain for every request (~13% of the proxied request's CPU in
// the bench profile) to set these same constant values; the gateway sets this object itself
// on every answer, routed or not, so what clients get is byte-identical and cannot drift.
export function helmetHeaders (): Readonly<Record<string, string>> {
  const headers: Record<string, string> = {}
  const res = {
    setHeader (name: string, value: string | number | readonly string[]) { headers[name.toLowerCase()] = String(value) },
    removeHeader (name: string) { delete headers[name.toLowerCase()] }
  }
  helmet(HELMET_OPTIONS)({} as IncomingMessage, res as unknown as ServerResponse, () => {})
  return Object.freeze(headers)
}

export const SECURITY_HEADERS = helmetHeaders()
export const SECURITY_HEADER_NAMES: ReadonlySet<string> = new Set(Object.keys(SECURITY_HEADERS))
