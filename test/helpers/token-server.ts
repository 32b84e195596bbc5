import { createServer } from 'node:http'
import type { IncomingHttpHeaders, ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { randomBytes } from 'node:crypto'
import type { Test } from 'tap'
import type { TestGateway } from './gateway.js'

// A real OAuth token endpoint on 127.0.0.1:0 that records each request's form parameters,
// so tests check what each upstream auth mode actually sends (never an HTTP mock).

export interface TokenRequest {
  readonly method: string
  readonly url: string
  readonly headers: IncomingHttpHeaders
  readonly form: Record<string, string>
}
export type TokenHandler = (req: TokenRequest, res: ServerResponse) => void | Promise<void>

export interface TokenServer {
  readonly url: string
  readonly requests: TokenRequest[]
  setHandler (h: TokenHandler): void
  // Answers every request with a fresh numbered token (`<prefix>-1`, `-2`, …).
  issue (options?: { expiresIn?: number, delayMs?: number }): void
  close (): Promise<void>
}

export const tokenFor = (prefix: string, n: number): string => `${prefix}-${n}`

export async function startTokenServer (prefix = 'upstream-token'): Promise<TokenServer> {
  const requests: TokenRequest[] = []
  let issued = 0
  const issuing = (options: { expiresIn?: number, delayMs?: number } = {}): TokenHandler => async (_req, res) => {
    if (options.delayMs !== undefined) await new Promise(resolve => setTimeout(resolve, options.delayMs))
    issued += 1
    res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' })
    res.end(JSON.stringify({ access_token: tokenFor(prefix, issued), token_type: 'Bearer', expires_in: options.expiresIn ?? 3600 }))
  }
  let handler: TokenHandler = issuing()
  const server = createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => { chunks.push(c) })
    req.on('end', () => {
      const form = Object.fromEntries(new URLSearchParams(Buffer.concat(chunks).toString('utf8')))
      const recorded: TokenRequest = { method: req.method ?? '', url: req.url ?? '', headers: req.headers, form }
      requests.push(recorded)
      Promise.resolve(handler(recorded, res)).catch(() => { res.destroy() })
    })
  })
  await new Promise<void>(resolve => { server.listen(0, '127.0.0.1', resolve) })
  const { port } = server.address() as AddressInfo
  return {
    url: `http://127.0.0.1:${port}/oauth2/token`,
    requests,
    setHandler (h) { handler = h },
    issue (options) { handler = issuing(options) },
    async close () {
      server.closeAllConnections()
      await new Promise<void>(resolve => { server.close(() => { resolve() }) })
    }
  }
}

export async function tokenServer (t: Test, prefix: string): Promise<TokenServer> {
  const server = await startTokenServer(prefix)
  t.teardown(async () => { await server.close() })
  return server
}

// Polls until `ok` (background refreshes finish on their own schedule).
export async function waitFor (t: Test, what: string, ok: () => boolean): Promise<void> {
  for (let i = 0; i < 200 && !ok(); i++) await new Promise(resolve => setTimeout(resolve, 10))
  t.ok(ok(), what)
}

// A registered machine calling the proxy with a valid gateway token.
type Call = (path?: string, init?: CallInit) => Promise<{ status: number, text: string }>
interface CallInit { method?: 'GET' | 'POST' | 'DELETE' | 'PUT', body?: string, headers?: Record<string, string> }

export async function proxyClient (gw: TestGateway): Promise<Call> {
  const { pair } = await gw.register(`ws-${randomBytes(3).toString('hex')}`)
  const agent = gw.agent(pair)
  // The gateway's own tokens live 300 s; fetch a new one whenever the test moved the clock.
  let token = await gw.fetchToken(agent)
  let fetchedAt = gw.clock.now
  return async (path = '/fhir/Patient/1', init = {}) => {
    if (gw.clock.now !== fetchedAt) {
      token = await gw.fetchToken(agent)
      fetchedAt = gw.clock.now
    }
    return await gw.call(agent, path, {
      method: init.method ?? 'GET',
      headers: { authorization: `Bearer ${token}`, ...init.headers },
      ...(init.body === undefined ? {} : { body: init.body })
    })
  }
}
