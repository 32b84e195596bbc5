import t from 'tap'
import { createHash, randomBytes } from 'node:crypto'
import { Readable } from 'node:stream'
import { connect as tlsConnect } from 'node:tls'
import type { TLSSocket } from 'node:tls'
import type { Test } from 'tap'
import type { Agent, Dispatcher } from 'undici'
import { startGateway, TEST_API_KEY } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'
import { assertProblem as assertProblemShape, closedPort } from '../helpers/assert.js'
import { helmetHeaders } from '../../gateway/security-headers.js'

type Headers = Record<string, string | string[] | undefined>
interface RawResponse { status: number, headers: Headers, text: string, json: () => Record<string, unknown> }

// Sends `path` exactly as given: gw.call goes through `new URL()`, which would resolve
// `..` and `%2e%2e` before the gateway ever saw them.
async function raw (gw: TestGateway, agent: Agent, path: string, options: { method?: Dispatcher.HttpMethod, headers?: Record<string, string>, body?: Dispatcher.DispatchOptions['body'] } = {}): Promise<RawResponse> {
  const res = await agent.request({ origin: gw.url, path, method: options.method ?? 'GET', headers: options.headers ?? {}, body: options.body ?? null })
  const text = await res.body.text()
  return { status: res.statusCode, headers: res.headers, text, json: () => JSON.parse(text) as Record<string, unknown> }
}


const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex')

function assertProblem (t: Test, res: RawResponse, status: number, code: string): void {
  assertProblemShape(t, res, status, code)
  t.notOk(res.text.includes(upstreamHostPort), 'no upstream host:port')
}

function assertSecurityHeaders (t: Test, res: RawResponse): void {
  for (const [name, value] of Object.entries(helmetHeaders())) t.equal(res.headers[name], value, `${name} on ${res.status}`)
}

const gw = await startGateway(t)
const { pair } = await gw.register('ws-proxy')
const agent = gw.agent(pair)
const token = await gw.fetchToken(agent)
const auth = { authorization: `Bearer ${token}` }
const upstreamHostPort = new URL(gw.upstream.url).host

t.beforeEach(() => {
  gw.upstream.requests.length = 0
  gw.upstream.setHandler((req, res) => {
    const payload = Buffer.from(JSON.stringify({ resourceType: 'Patient', id: 'echo', method: req.method, url: req.url }))
    res.writeHead(200, { 'content-type': 'application/fhir+json', 'content-length': String(payload.length) })
    res.end(payload)
  })
})

t.test('method, path and query reach the upstream under its base path', async t => {
  for (const method of ['GET', 'DELETE', 'PUT', 'PATCH', 'OPTIONS'] as const) {
    gw.upstream.requests.length = 0
    const res = await raw(gw, agent, '/fhir/Patient/1/_history?_count=2&_since=2024-01-01', { method, headers: auth })
    t.equal(res.status, 200, `${method}: ${res.text}`)
    t.equal(gw.upstream.requests.length, 1)
    t.equal(gw.upstream.requests[0]?.method, method)
    t.equal(gw.upstream.requests[0]?.url, '/fhir/Patient/1/_history?_count=2&_since=2024-01-01')
  }
  const bare = await raw(gw, agent, '/fhir', { headers: auth })
  t.equal(bare.status, 200, bare.text)
  t.equal(gw.upstream.requests.at(-1)?.url, '/fhir')
  const encoded = await raw(gw, agent, '/fhir/Patient/a%20b/$everything', { headers: auth })
  t.equal(encoded.status, 200, encoded.text)
  t.equal(gw.upstream.requests.at(-1)?.url, '/fhir/Patient/a%20b/$everything', 'forwarded still encoded')
})

t.test('HEAD is proxied without a body', async t => {
  const res = await raw(gw, agent, '/fhir/Patient/1', { method: 'HEAD', headers: auth })
  t.equal(res.status, 200)
  t.equal(res.text, '')
  t.equal(gw.upstream.requests[0]?.method, 'HEAD')
})

t.test('a 1 MB POST body is streamed intact, with and without Content-Length', async t => {
  const body = randomBytes(1024 * 1024)
  const res = await raw(gw, agent, '/fhir/Binary', { method: 'POST', headers: { ...auth, 'content-type': 'application/octet-stream' }, body })
  t.equal(res.status, 200, res.text)
  t.equal(gw.upstream.requests[0]?.body.length, body.length)
  t.equal(sha256(gw.upstream.requests[0]?.body ?? Buffer.alloc(0)), sha256(body))
  t.equal(gw.upstream.requests[0]?.headers['content-type'], 'application/octet-stream')

  gw.upstream.requests.length = 0
  async function * chunks (): AsyncGenerator<Buffer> {
    for (let i = 0; i < 16; i++) yield body.subarray(i * 65536, (i + 1) * 65536)
  }
  const chunked = await raw(gw, agent, '/fhir/Binary', { method: 'PUT', headers: { ...auth, 'content-type': 'application/fhir+json' }, body: Readable.from(chunks()) })
  t.equal(chunked.status, 200, chunked.text)
  t.equal(sha256(gw.upstream.requests[0]?.body ?? Buffer.alloc(0)), sha256(body))
})

t.test('upstream status, headers and body come back', async t => {
  gw.upstream.setHandler((req, res) => {
    if (req.method === 'POST') {
      res.writeHead(201, { location: '/fhir/Patient/2/_history/1', etag: 'W/"1"', 'content-type': 'application/fhir+json' })
      res.end('{"resourceType":"Patient","id":"2"}')
      return
    }
    res.writeHead(404, { 'content-type': 'application/fhir+json', 'x-upstream-thing': 'kept' })
    res.end('{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"not-found"}]}')
  })
  const missing = await raw(gw, agent, '/fhir/Patient/nope', { headers: auth })
  t.equal(missing.status, 404)
  t.equal(missing.headers['content-type'], 'application/fhir+json')
  t.equal(missing.headers['x-upstream-thing'], 'kept')
  t.match(missing.json(), { resourceType: 'OperationOutcome' })

  const created = await raw(gw, agent, '/fhir/Patient', { method: 'POST', headers: { ...auth, 'content-type': 'application/fhir+json' }, body: '{"resourceType":"Patient"}' })
  t.equal(created.status, 201)
  t.equal(created.headers['location'], '/fhir/Patient/2/_history/1')
  t.equal(created.headers['etag'], 'W/"1"')
  t.same(created.json(), { resourceType: 'Patient', id: '2' })
  t.equal(gw.upstream.requests.at(-1)?.body.toString(), '{"resourceType":"Patient"}')
})

// FHIR servers answer creates with an absolute Location under their own base URL; passed
// through verbatim it names the internal upstream host and port, and the frontend cannot
// follow it through the gateway.
t.test('an absolute upstream Location does not leak the upstream origin', async t => {
  gw.upstream.setHandler((_req, res) => {
    res.writeHead(201, { location: `${gw.upstream.url}/Patient/3/_history/1`, 'content-location': `${gw.upstream.url}/Patient/3/_history/1` })
    res.end()
  })
  const res = await raw(gw, agent, '/fhir/Patient', { method: 'POST', headers: { ...auth, 'content-type': 'application/fhir+json' }, body: '{}' })
  t.equal(res.status, 201)
  t.notMatch(String(res.headers['location']), upstreamHostPort, 'Location rewritten to the gateway')
  t.notMatch(String(res.headers['content-location']), upstreamHostPort, 'Content-Location rewritten')
})

t.test('client credentials and forwarded identity never reach the upstream; our key does', async t => {
  const res = await raw(gw, agent, '/fhir/Patient/1', {
    headers: {
      ...auth,
      cookie: 'session=client-cookie-value',
      dpop: 'eyJhbGciOiJFUzI1NiJ9.client-proof.sig',
      'x-forwarded-for': '10.9.9.9',
      'x-ssl-client-verify': 'SUCCESS',
      'client-cert': ':MIIB:',
      'x-api-key': 'attacker',
      'x-request-id': 'client-chosen-id',
      accept: 'application/fhir+json',
      'if-none-match': 'W/"7"'
    }
  })
  t.equal(res.status, 200, res.text)
  const seen = gw.upstream.requests[0]?.headers ?? {}
  t.equal(seen['x-api-key'], TEST_API_KEY)
  for (const name of ['authorization', 'cookie', 'dpop', 'x-forwarded-for', 'x-ssl-client-verify', 'client-cert']) {
    t.equal(seen[name], undefined, `${name} stripped`)
  }
  t.notMatch(JSON.stringify(gw.upstream.requests[0]?.rawHeaders), /attacker|client-cookie-value|client-proof|Bearer/)
  t.equal(seen['accept'], 'application/fhir+json')
  t.equal(seen['if-none-match'], 'W/"7"')
  t.not(seen['x-request-id'], 'client-chosen-id')
  t.equal(res.headers['x-request-id'], seen['x-request-id'], 'x-request-id matches what the upstream got')
  t.match(res.headers['x-request-id'], /^[0-9a-f-]{36}$/)
})

// Without TRUSTED_PROXIES nobody may name a certificate in a header (test/gateway/forwarded.test.ts
// has the trusted side).
t.test('forwarded client-certificate headers from a direct client are refused, not passed on', async t => {
  const before = gw.upstream.requests.length
  for (const [name, value] of [['x-forwarded-client-cert', 'Hash=deadbeef;Subject="CN=admin"'], ['x-ssl-client-cert', '-----BEGIN%20CERTIFICATE-----']] as const) {
    assertProblem(t, await raw(gw, agent, '/fhir/Patient/1', { headers: { ...auth, [name]: value } }), 400, 'FORWARDED_HEADER_UNTRUSTED')
  }
  t.equal(gw.upstream.requests.length, before, 'the upstream saw none of them')
})

t.test('hop-by-hop and Connection-listed headers are stripped both ways', async t => {
  gw.upstream.setHandler((_req, res) => {
    res.writeHead(200, { connection: 'keep-alive, x-upstream-hop', 'keep-alive': 'timeout=5', 'x-upstream-hop': 'internal', 'content-type': 'text/plain' })
    res.end('ok')
  })
  // undici (the test client) validates a Connection header but never sends it, so
  // Connection-listed request headers are tested over a raw socket below.
  const res = await raw(gw, agent, '/fhir/Patient/1', { headers: { ...auth, te: 'trailers', 'x-kept': 'yes' } })
  t.equal(res.status, 200, res.text)
  t.equal(res.text, 'ok')
  const seen = gw.upstream.requests[0]?.headers ?? {}
  t.equal(seen['te'], undefined)
  t.equal(seen['x-kept'], 'yes')
  t.equal(res.headers['x-upstream-hop'], undefined)
  t.not(res.headers['keep-alive'], 'timeout=5', "the upstream's Keep-Alive is not relayed")
})

// undici will not send Connection, Keep-Alive, Upgrade or Transfer-Encoding headers as
// given, so these go over a raw TLS socket.
t.test('Connection-listed and hop-by-hop request headers, over a raw TLS socket', async t => {
  const port = new URL(gw.url).port
  const head = [
    'GET /fhir/Patient/raw HTTP/1.1',
    'Host: localhost',
    `Authorization: Bearer ${token}`,
    'Connection: close, X-Secret',
    'X-Secret: 1',
    'Keep-Alive: timeout=5',
    'Proxy-Connection: keep-alive',
    'Proxy-Authorization: Basic Zm9vOmJhcg==',
    'Trailer: x-t',
    'X-Kept: yes',
    '', ''
  ].join('\r\n')
  const response = await new Promise<string>((resolve, reject) => {
    const socket = tlsConnect({ host: '127.0.0.1', port: Number(port), servername: 'localhost', ca: gw.pki.ca.cert, cert: pair.cert, key: pair.key }, () => { socket.write(head) })
    const chunks: Buffer[] = []
    socket.on('data', (c: Buffer) => { chunks.push(c) })
    socket.on('end', () => { resolve(Buffer.concat(chunks).toString()) })
    socket.on('error', reject)
  })
  t.match(response, /^HTTP\/1\.1 200 /)
  const seen = gw.upstream.requests[0]?.headers ?? {}
  t.equal(gw.upstream.requests[0]?.url, '/fhir/Patient/raw')
  for (const name of ['x-secret', 'keep-alive', 'proxy-connection', 'proxy-authorization', 'trailer']) {
    t.equal(seen[name], undefined, `${name} stripped`)
  }
  t.equal(seen['x-kept'], 'yes')
})

t.test('path traversal over the wire: 400 PATH_INVALID, upstream never called', async t => {
  const attempts = [
    '/fhir/../x',
    '/fhir/Patient/..',
    '/fhir/%2e%2e/x',
    '/fhir/%2E%2e/x',
    '/fhir/.%2e/x',
    '/fhir/./x',
    '/fhir/Patient%2f..%2fadmin',
    '/fhir/Patient%5c..',
    '/fhir/Patient\\..',
    '/fhir//evil.example/x',
    '/fhir/a//b',
    '/fhir/a%00b'
  ]
  for (const path of attempts) {
    const res = await raw(gw, agent, path, { headers: auth })
    assertProblem(t, res, 400, 'PATH_INVALID')
    assertSecurityHeaders(t, res)
  }
  t.equal(gw.upstream.requests.length, 0, 'nothing reached the upstream')
})

// `..;` is `..` to Tomcat and Jetty (HAPI FHIR's usual containers) once they drop the path
// parameter, so it must not reach the upstream.
t.test('dot segments with path parameters never reach the upstream', async t => {
  for (const path of ['/fhir/..;/admin', '/fhir/Patient/%2e%2e;x=1/admin']) {
    const res = await raw(gw, agent, path, { headers: auth })
    t.equal(res.status, 400, `${path}: ${res.status}`)
  }
  t.same(gw.upstream.requests.map(r => r.url), [], 'nothing reached the upstream')
})

// find-my-way cannot decode the path, so Fastify answers from its onBadUrl fallback before
// any hook runs: plain JSON, no security headers, no request id, and the whole URL, query
// values included, echoed back.
t.test('invalid percent-encoding is refused as a problem and never proxied', async t => {
  const res = await raw(gw, agent, '/fhir/%zz?name=SecretSmith', { headers: auth })
  t.equal(res.status, 400, res.text)
  t.equal(gw.upstream.requests.length, 0)
  t.match(res.headers['content-type'], /^application\/problem\+json/, 'problem+json')
  t.match(res.text, /"code":"(PATH_INVALID|BAD_REQUEST)"/, 'a code of ours')
  t.notMatch(res.text, /SecretSmith/, 'no query value echoed')
  t.match(res.headers['strict-transport-security'], /max-age=\d+/, 'HSTS')
  t.equal(res.headers['x-content-type-options'], 'nosniff', 'nosniff')
  t.type(res.headers['x-request-id'], 'string', 'x-request-id')
})

t.test('a path outside the prefix is not proxied', async t => {
  const res = await raw(gw, agent, '/fhirx/Patient', { headers: auth })
  assertProblem(t, res, 404, 'NOT_FOUND')
  t.equal(gw.upstream.requests.length, 0)
})

t.test('unknown route → 404 problem NOT_FOUND with security headers', async t => {
  const res = await raw(gw, agent, '/nope?secret=x')
  assertProblem(t, res, 404, 'NOT_FOUND')
  assertSecurityHeaders(t, res)
  t.notMatch(res.text, /secret=x/)
})

t.test('security headers on proxied and refused responses', async t => {
  const ok = await raw(gw, agent, '/fhir/Patient/1', { headers: auth })
  t.equal(ok.status, 200)
  assertSecurityHeaders(t, ok)
  const noToken = await raw(gw, agent, '/fhir/Patient/1')
  assertProblem(t, noToken, 401, 'TOKEN_MISSING')
  assertSecurityHeaders(t, noToken)
  const noCert = await raw(gw, gw.agent(), '/fhir/Patient/1', { headers: auth })
  assertProblem(t, noCert, 401, 'CLIENT_CERT_REQUIRED')
  assertSecurityHeaders(t, noCert)
  t.equal(gw.upstream.requests.length, 1)
})

// clientResponseHeaders is applied after helmet's onRequest hook, so an upstream header of
// the same name replaces the gateway's policy for the gateway's own origin.
t.test("the upstream cannot override the gateway's security headers", async t => {
  gw.upstream.setHandler((_req, res) => {
    res.writeHead(200, { 'strict-transport-security': 'max-age=0', 'x-content-type-options': 'none', 'x-frame-options': 'ALLOWALL', 'content-type': 'text/html' })
    res.end('<p>hi</p>')
  })
  const res = await raw(gw, agent, '/fhir/Binary/1', { headers: auth })
  t.equal(res.status, 200)
  t.match(res.headers['strict-transport-security'], /max-age=[1-9]\d*/, 'HSTS kept')
  t.equal(res.headers['x-content-type-options'], 'nosniff', 'nosniff kept')
  t.equal(res.headers['x-frame-options'], 'DENY', 'frame options kept')
})

// The proxy writes a streamed answer itself, not through Fastify's send, so what the other
// hooks set must still be on it.
t.test('a proxied answer carries the headers the hooks set: rate limit, request id, security', async t => {
  gw.upstream.setHandler((_req, res) => {
    res.writeHead(200, { 'content-type': 'application/fhir+json', 'x-request-id': 'upstream-chosen', 'x-ratelimit-remaining': '999999' })
    res.end('{"resourceType":"Patient"}')
  })
  const res = await raw(gw, agent, '/fhir/Patient/1', { headers: auth })
  t.equal(res.status, 200)
  t.equal(res.headers['content-type'], 'application/fhir+json')
  t.match(res.headers['x-request-id'], /^[0-9a-f-]{36}$/, "the gateway's request id, not the upstream's")
  t.equal(gw.upstream.requests.at(-1)?.headers['x-request-id'], res.headers['x-request-id'], 'the id the upstream was sent')
  t.match(res.headers['x-ratelimit-limit'], /^\d+$/, 'the rate limit is announced')
  t.not(res.headers['x-ratelimit-remaining'], '999999', "the limiter's count, not the upstream's")
  assertSecurityHeaders(t, res)
})

t.test('a large answer is streamed whole to a slow reader (backpressure)', async t => {
  const body = randomBytes(8 * 1024 * 1024)
  gw.upstream.setHandler((_req, res) => {
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(body.length) })
    res.end(body)
  })
  const res = await agent.request({ origin: gw.url, path: '/fhir/Binary/big', method: 'GET', headers: auth })
  t.equal(res.statusCode, 200)
  const chunks: Buffer[] = []
  for await (const chunk of res.body) {
    chunks.push(chunk as Buffer)
    // A reader slower than the upstream: the gateway must pause the upstream, not buffer it all.
    if (chunks.length % 16 === 0) await new Promise(resolve => setTimeout(resolve, 1))
  }
  t.equal(sha256(Buffer.concat(chunks)), sha256(body), 'every byte, in order')
})

t.test('answers proxied while the gateway drains tell the client to reconnect elsewhere', async t => {
  const draining = await startGateway(t)
  const { pair: drainPair } = await draining.register('ws-drain')
  const drainAgent = draining.agent(drainPair)
  const drainAuth = { authorization: `Bearer ${await draining.fetchToken(drainAgent)}` }
  let release: () => void = () => {}
  const held = new Promise<void>(resolve => { release = resolve })
  let arrived: () => void = () => {}
  const upstreamHasIt = new Promise<void>(resolve => { arrived = resolve })
  draining.upstream.setHandler((_req, res) => {
    arrived()
    void held.then(() => { res.writeHead(200, { 'content-type': 'application/fhir+json' }); res.end('{}') })
  })
  const pending = raw(draining, drainAgent, '/fhir/Patient/1', { headers: drainAuth })
  await upstreamHasIt
  const closing = draining.app.close()
  await new Promise(resolve => setTimeout(resolve, 50))
  release()
  const res = await pending
  await closing
  t.equal(res.status, 200, 'the request in flight is served')
  t.equal(res.headers['connection'], 'close')
})

// DESIGN step 5 / proxy.ts: a client that goes away must not leave a request running
// against the EHR.
t.test('a client that goes away aborts the upstream request', async t => {
  let upstreamClosed: () => void = () => {}
  const closed = new Promise<void>(resolve => { upstreamClosed = resolve })
  let arrived: () => void = () => {}
  const arrival = new Promise<void>(resolve => { arrived = resolve })
  gw.upstream.setHandler(async (_req, res) => {
    arrived()
    await new Promise<void>(resolve => {
      const timer = setTimeout(resolve, 5000)
      res.once('close', () => { clearTimeout(timer); upstreamClosed(); resolve() })
    })
    if (!res.destroyed) res.end()
  })
  const controller = new AbortController()
  const pending = agent.request({ origin: gw.url, path: '/fhir/Patient/hang', method: 'GET', headers: auth, signal: controller.signal })
  await arrival
  controller.abort()
  await t.rejects(pending)
  const outcome = await Promise.race([closed.then(() => 'aborted'), new Promise(resolve => setTimeout(() => { resolve('still running') }, 2000))])
  t.equal(outcome, 'aborted', 'the upstream saw its request go away')
  await new Promise(resolve => setTimeout(resolve, 100))
  const errors = gw.logs.filter(l => l.includes('/fhir/Patient/hang') || l.includes('aborted')).map(l => JSON.parse(l) as { level: number, msg: string }).filter(l => l.level >= 50)
  t.same(errors, [], 'a client cancel is not logged as an EHR failure')
})

t.test('a client that goes away mid-response stops the upstream stream', async t => {
  let upstreamClosed: () => void = () => {}
  const closed = new Promise<void>(resolve => { upstreamClosed = resolve })
  gw.upstream.setHandler(async (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/fhir+ndjson' })
    const timer = setInterval(() => { res.write('{"resourceType":"Patient"}\n') }, 20)
    res.once('close', () => { clearInterval(timer); upstreamClosed() })
    setTimeout(() => { clearInterval(timer); if (!res.destroyed) res.end() }, 5000).unref()
  })
  const res = await agent.request({ origin: gw.url, path: '/fhir/Patient/$export', method: 'GET', headers: auth })
  t.equal(res.statusCode, 200)
  for await (const chunk of res.body) {
    t.ok((chunk as Buffer).length > 0, 'streaming')
    break // leaving the loop destroys the body and its socket
  }
  const outcome = await Promise.race([closed.then(() => 'aborted'), new Promise(resolve => setTimeout(() => { resolve('still running') }, 2000))])
  t.equal(outcome, 'aborted', 'the upstream response was cut off too')
})

t.test('body limit and header timeout', async t => {
  const small = await startGateway(t, { db: gw.db, pki: gw.pki, env: { BODY_LIMIT_BYTES: '1024', UPSTREAM_HEADERS_TIMEOUT_MS: '200' } })
  const smallAgent = small.agent(pair)
  const smallAuth = { authorization: `Bearer ${await small.fetchToken(smallAgent)}` }

  t.test('413 with Content-Length, before connecting upstream', async t => {
    const res = await raw(small, smallAgent, '/fhir/Binary', { method: 'POST', headers: { ...smallAuth, 'content-type': 'application/octet-stream' }, body: randomBytes(2048) })
    assertProblem(t, res, 413, 'BODY_TOO_LARGE')
    assertSecurityHeaders(t, res)
    t.equal(small.upstream.requests.length, 0)
  })

  t.test('413 with a chunked body', async t => {
    async function * chunks (): AsyncGenerator<Buffer> {
      for (let i = 0; i < 4; i++) yield randomBytes(512)
    }
    const res = await raw(small, smallAgent, '/fhir/Binary', { method: 'POST', headers: { ...smallAuth, 'content-type': 'application/octet-stream' }, body: Readable.from(chunks()) })
    assertProblem(t, res, 413, 'BODY_TOO_LARGE')
    assertSecurityHeaders(t, res)
    t.equal(small.upstream.requests.length, 0, 'the upstream never got a complete request')
  })

  t.test('a body far over the limit with Content-Length gets a 413, not a reset', async t => {
    const sized = await raw(small, smallAgent, '/fhir/Binary', { method: 'POST', headers: { ...smallAuth, 'content-type': 'application/octet-stream' }, body: randomBytes(4 * 1024 * 1024) })
    assertProblem(t, sized, 413, 'BODY_TOO_LARGE')
  })

  t.test('a body exactly at the limit passes', async t => {
    const body = randomBytes(1024)
    const res = await raw(small, smallAgent, '/fhir/Binary', { method: 'POST', headers: { ...smallAuth, 'content-type': 'application/octet-stream' }, body })
    t.equal(res.status, 200, res.text)
    t.equal(sha256(small.upstream.requests.at(-1)?.body ?? Buffer.alloc(0)), sha256(body))
  })

  t.test('slow upstream headers → 504 UPSTREAM_TIMEOUT', async t => {
    small.upstream.setHandler(async (_req, res) => {
      await new Promise<void>(resolve => {
        const timer = setTimeout(resolve, 1500)
        res.once('close', () => { clearTimeout(timer); resolve() })
      })
      if (!res.destroyed) res.end('late')
    })
    const started = Date.now()
    const res = await raw(small, smallAgent, '/fhir/Patient/slow', { headers: smallAuth })
    assertProblem(t, res, 504, 'UPSTREAM_TIMEOUT')
    assertSecurityHeaders(t, res)
    t.ok(Date.now() - started < 1400, 'answered at the timeout, not when the upstream finally answered')
    t.notMatch(res.text, new URL(small.upstream.url).host)
    t.notMatch(res.text, /127\.0\.0\.1|Headers Timeout|UND_ERR/)
  })
})

// limitBody stops reading the request mid-body and nothing drains or closes the socket:
// the gateway's side of the connection stays open, paused, until Node's request timeout
// (about 70 s here), and app.close() waits for it.
t.test('an oversized chunked upload does not pin the connection', async t => {
  const huge = await startGateway(t, { db: gw.db, pki: gw.pki, env: { BODY_LIMIT_BYTES: '1024' } })
  const sockets: TLSSocket[] = []
  huge.app.server.on('secureConnection', (socket: TLSSocket) => { sockets.push(socket) })
  // Whatever the outcome, do not let a pinned socket hold this file's teardown for a minute.
  t.teardown(() => { for (const socket of sockets) socket.destroy() })
  const hugeAgent = huge.agent(pair)
  const hugeAuth = { authorization: `Bearer ${await huge.fetchToken(hugeAgent)}` }
  const before = sockets.length
  async function * chunks (): AsyncGenerator<Buffer> {
    for (let i = 0; i < 64; i++) {
      yield randomBytes(65536)
      await new Promise(resolve => setImmediate(resolve))
    }
  }
  const uploadAgent = huge.agent(pair)
  const res = await raw(huge, uploadAgent, '/fhir/Binary', { method: 'POST', headers: { ...hugeAuth, 'content-type': 'application/octet-stream' }, body: Readable.from(chunks()) })
  assertProblem(t, res, 413, 'BODY_TOO_LARGE')
  const upload = sockets[before]
  t.ok(upload !== undefined, 'saw the upload connection')
  const next = await raw(huge, uploadAgent, '/fhir/Patient/1', { headers: hugeAuth })
  t.equal(next.status, 200, 'the client can carry on')
  await new Promise(resolve => setTimeout(resolve, 1500))
  t.ok(upload?.destroyed === true, 'the gateway closed (or drained) the connection it stopped reading')
})

t.test('upstream down → 502 UPSTREAM_UNAVAILABLE without internals', async t => {
  const port = await closedPort()
  const down = await startGateway(t, { db: gw.db, pki: gw.pki, env: { EHR_UPSTREAM_URL: `http://127.0.0.1:${port}/fhir` } })
  const downAgent = down.agent(pair)
  const downAuth = { authorization: `Bearer ${await down.fetchToken(downAgent)}` }
  const res = await raw(down, downAgent, '/fhir/Patient/1', { headers: downAuth })
  assertProblem(t, res, 502, 'UPSTREAM_UNAVAILABLE')
  assertSecurityHeaders(t, res)
  t.notMatch(res.text, String(port))
  t.notMatch(res.text, /127\.0\.0\.1|ECONNREFUSED|connect/i)
  t.equal(res.headers['x-request-id'], (res.json()['instance'] as string).replace('urn:request:', ''))
})

t.test('an upstream URL without a path proxies the bare prefix to /', async t => {
  const root = await startGateway(t, { db: gw.db, pki: gw.pki, env: { EHR_UPSTREAM_URL: gw.upstream.origin } })
  const rootAgent = root.agent(pair)
  const rootAuth = { authorization: `Bearer ${await root.fetchToken(rootAgent)}` }
  const sub = await raw(root, rootAgent, '/fhir/Patient/1', { headers: rootAuth })
  t.equal(sub.status, 200, sub.text)
  t.equal(gw.upstream.requests.at(-1)?.url, '/Patient/1')
  const bare = await raw(root, rootAgent, '/fhir?_count=1', { headers: rootAuth })
  t.equal(bare.status, 200, `bare prefix: ${bare.text}`)
})


// Review finding: framing errors were answered with Fastify's own JSON, no code, no headers.
t.test('malformed HTTP gets a problem with security headers and a closed connection', async t => {
  const port = Number(new URL(gw.url).port)
  const send = async (head: string): Promise<string> => await new Promise<string>((resolve, reject) => {
    const socket = tlsConnect({ host: '127.0.0.1', port, servername: 'localhost', ca: gw.pki.ca.cert, cert: pair.cert, key: pair.key }, () => { socket.write(head) })
    const chunks: Buffer[] = []
    socket.on('data', (c: Buffer) => { chunks.push(c) })
    socket.on('close', () => { resolve(Buffer.concat(chunks).toString()) })
    socket.on('error', reject)
  })
  const smuggle = await send('POST /fhir/Patient HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n')
  t.match(smuggle, /^HTTP\/1\.1 400 /)
  t.match(smuggle, /content-type: application\/problem\+json/)
  t.match(smuggle, /strict-transport-security: max-age=\d+/)
  t.match(smuggle, /"code":"BAD_REQUEST"/)
  const huge = await send(`GET /fhir/Patient/1 HTTP/1.1\r\nHost: localhost\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`)
  t.match(huge, /^HTTP\/1\.1 431 /)
  t.match(huge, /"code":"HEADERS_TOO_LARGE"/)
  t.equal(gw.upstream.requests.length, 0)
})

// Review finding: the EHR only ever sees our credentials, so its 401 is our fault.
t.test("an upstream 401 is the gateway's problem: 502 UPSTREAM_AUTH_FAILED, no upstream challenge", async t => {
  gw.upstream.setHandler((_req, res) => {
    res.writeHead(401, { 'www-authenticate': 'Bearer realm="https://accounts.example/"', 'content-type': 'application/json' })
    res.end('{"error":"project example-internal-123 denied"}')
  })
  t.teardown(() => { gw.upstream.setHandler((_req, res) => { res.writeHead(200, { 'content-type': 'application/fhir+json' }); res.end('{}') }) })
  const res = await raw(gw, agent, '/fhir/Patient/1', { headers: auth })
  assertProblem(t, res, 502, 'UPSTREAM_AUTH_FAILED')
  t.equal(res.headers['www-authenticate'], undefined)
  t.notMatch(res.text, /example-internal/)
})

// Review finding: a refused answer is read only to reuse its connection; one that never
// ends must not hold the client's 502 back.
t.test('an upstream 401 with an endless body is refused at once, not read to its end', async t => {
  let written = 0
  gw.upstream.setHandler((_req, res) => {
    res.writeHead(401, { 'content-type': 'application/json' })
    const chunk = Buffer.alloc(64 * 1024, 'x')
    const pump = (): void => {
      while (!res.destroyed && written < 64 * 1024 * 1024) {
        written += chunk.length
        if (!res.write(chunk)) { res.once('drain', pump); return }
      }
    }
    pump()
  })
  t.teardown(() => { gw.upstream.setHandler((_req, res) => { res.writeHead(200, { 'content-type': 'application/fhir+json' }); res.end('{}') }) })
  const res = await raw(gw, agent, '/fhir/Patient/1', { headers: auth })
  assertProblem(t, res, 502, 'UPSTREAM_AUTH_FAILED')
  t.ok(written < 16 * 1024 * 1024, `the gateway stopped reading early (${written} bytes sent)`)
})

t.test('upstream cookies, server software and tracing headers stay behind', async t => {
  gw.upstream.setHandler((_req, res) => {
    res.writeHead(200, { 'content-type': 'application/fhir+json', 'set-cookie': 'GCLB=abc', server: 'ESF', via: '1.1 google', 'x-cloud-trace-context': 'abc/1', etag: 'W/"2"' })
    res.end('{}')
  })
  t.teardown(() => { gw.upstream.setHandler((_req, res) => { res.writeHead(200, { 'content-type': 'application/fhir+json' }); res.end('{}') }) })
  const res = await raw(gw, agent, '/fhir/Patient/1', { headers: auth })
  t.equal(res.status, 200)
  for (const name of ['set-cookie', 'server', 'via', 'x-cloud-trace-context']) t.equal(res.headers[name], undefined, `${name} dropped`)
  t.equal(res.headers['etag'], 'W/"2"')
})

// Review finding: CORS and DPoP nonces are the gateway's; an EHR's would open the gateway's
// origin to sites nobody configured, or hand clients nonces the gateway never issued.
t.test("the upstream's CORS and DPoP-Nonce headers stay behind", async t => {
  gw.upstream.setHandler((_req, res) => {
    res.writeHead(200, { 'content-type': 'application/fhir+json', 'access-control-allow-origin': '*', 'access-control-allow-credentials': 'true', 'access-control-expose-headers': 'x-secret', 'dpop-nonce': 'ehr-nonce' })
    res.end('{}')
  })
  t.teardown(() => { gw.upstream.setHandler((_req, res) => { res.writeHead(200, { 'content-type': 'application/fhir+json' }); res.end('{}') }) })
  const res = await raw(gw, agent, '/fhir/Patient/1', { headers: { ...auth, origin: 'https://evil.example' } })
  t.equal(res.status, 200)
  for (const name of ['access-control-allow-origin', 'access-control-allow-credentials', 'access-control-expose-headers', 'dpop-nonce']) t.equal(res.headers[name], undefined, `${name} dropped`)
})

t.test('method overrides, original-URL and quota headers never reach the upstream', async t => {
  const spoof = {
    'x-http-method-override': 'DELETE',
    'x-original-url': '/admin',
    'x-forwarded-prefix': '/evil',
    'x-forwarded-for': '10.9.9.9',
    'true-client-ip': '10.9.9.9',
    'x-envoy-original-path': '/admin',
    'x-goog-user-project': 'someone-elses-project',
    'prefer': 'return=minimal'
  }
  const res = await raw(gw, agent, '/fhir/Patient/1', { headers: { ...auth, ...spoof } })
  t.equal(res.status, 200)
  const seen = gw.upstream.requests[0]?.headers ?? {}
  for (const name of Object.keys(spoof).filter(n => n !== 'prefer')) t.equal(seen[name], undefined, `${name} dropped`)
  t.equal(seen['prefer'], 'return=minimal', 'FHIR headers pass')
})
