import { createServer } from 'node:net'
import type { AddressInfo } from 'node:net'
import type { Test } from 'tap'

export interface HttpResponse {
  readonly status: number
  readonly headers: Record<string, string | string[] | undefined>
  readonly text: string
  json(): Record<string, unknown>
}

// Every refusal is an RFC 9457 problem with the contract's code (DESIGN.md, errors), and
// never a stack trace. A known bug can be marked `todo` on the assertions rather than the
// test, so the test still runs (and TAP_FAIL_TODO=1 turns it red).
export function assertProblem (t: Test, res: HttpResponse, status: number, code: string, todo?: string): void {
  const extra = todo === undefined ? {} : { todo }
  t.equal(res.status, status, `status ${status} (${res.text})`, extra)
  t.match(String(res.headers['content-type']), /^application\/problem\+json/, 'problem content type', extra)
  let body: Record<string, unknown> = {}
  try { body = res.json() } catch {}
  t.equal(body['code'], code, `code ${code}`, extra)
  t.equal(body['status'], status, 'status member', extra)
  t.type(body['type'], 'string', 'type member', extra)
  t.type(body['title'], 'string', 'title member', extra)
  t.type(body['detail'], 'string', 'detail member', extra)
  t.notMatch(res.text, /\bat .+:\d+:\d+|node:internal|\.ts:\d+|\.js:\d+/, 'no stack trace', extra)
}

// POST /v1/token refusals to a standard OAuth (form) request: RFC 6749 §5.2 JSON with `error`,
// and the problem members beside it.
export function assertOAuthError (t: Test, res: HttpResponse, status: number, code: string, error: string): void {
  t.equal(res.status, status, `status ${status} (${res.text})`)
  t.match(String(res.headers['content-type']), /^application\/json/, 'OAuth content type')
  let body: Record<string, unknown> = {}
  try { body = res.json() } catch {}
  t.equal(body['error'], error, `error ${error}`)
  t.type(body['error_description'], 'string', 'error_description member')
  t.equal(body['code'], code, `code ${code}`)
  t.equal(body['status'], status, 'status member')
  t.type(body['type'], 'string', 'type member')
}

// A port nothing listens on: bound, then released.
export async function closedPort (): Promise<number> {
  const server = createServer()
  await new Promise<void>(resolve => { server.listen(0, '127.0.0.1', resolve) })
  const { port } = server.address() as AddressInfo
  await new Promise<void>(resolve => { server.close(() => { resolve() }) })
  return port
}
