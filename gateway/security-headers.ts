import type { IncomingMessage, ServerResponse } from 'node:http'
import helmet from 'helmet'

// helmet's default headers as a plain object, computed once. @fastify/helmet sets them on
// every response that reaches a route; the few answers Fastify gives before routing
// (undecodable URLs, malformed HTTP) use this same set, so the two cannot drift apart.
export function helmetDefaultHeaders (): Readonly<Record<string, string>> {
  const headers: Record<string, string> = {}
  const res = {
    setHeader (name: string, value: string | number | readonly string[]) { headers[name.toLowerCase()] = String(value) },
    removeHeader (name: string) { delete headers[name.toLowerCase()] }
  }
  helmet()({} as IncomingMessage, res as unknown as ServerResponse, () => {})
  return Object.freeze(headers)
}
