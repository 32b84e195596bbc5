import t from 'tap'
import { createHash, randomBytes } from 'node:crypto'
import { connect as tlsConnect } from 'node:tls'
import type { TLSSocket } from 'node:tls'
import type { KeyPair } from '../../gateway/demo/pki.js'
import { startGateway } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'

// A registered workstation that asked for a large answer and then stopped reading, its TLS
// connection left open, kept the upstream response paused for backpressure for ever:
// undici suspends bodyTimeout while paused and nothing else timed the client out, so a few
// such clients held the whole upstream pool. UPSTREAM_BODY_TIMEOUT_MS now bounds a stalled
// client as it bounds a stalled EHR (nginx's send_timeout).

const BODY_TIMEOUT_MS = 500
const CUT_LINE = 'client stopped reading; response cut after UPSTREAM_BODY_TIMEOUT_MS'
// More than the kernel buffers of both loopback connections hold (a receive buffer may grow
// to tcp_rmem's 32 MB here): the upstream cannot finish writing it while the client stalls,
// so its connection is not closed by the upstream's own keep-alive timer either.
const STALLED = Buffer.alloc(64 * 1024 * 1024, 'a')
const SLOW = randomBytes(48 * 1024 * 1024)
const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

async function within<T> (ms: number, what: Promise<T>): Promise<T | 'timed out'> {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<'timed out'>(resolve => { timer = setTimeout(() => { resolve('timed out') }, ms) })
  try {
    return await Promise.race([what, late])
  } finally {
    clearTimeout(timer)
  }
}

async function until (ms: number, check: () => boolean | Promise<boolean>): Promise<boolean> {
  const deadline = Date.now() + ms
  for (;;) {
    if (await check()) return true
    if (Date.now() > deadline) return false
    await sleep(25)
  }
}

// The upstream answers …/stalled and …/slow with those bodies, anything else with a small
// JSON, and tells, per path, when the connection the answer went out on closed (undici
// keeps a connection it read an answer from whole open for the next request).
function serve (gw: TestGateway): Map<string, Promise<void>> {
  const closed = new Map<string, Promise<void>>()
  gw.upstream.setHandler((req, res) => {
    closed.set(req.url, new Promise(resolve => { res.socket?.once('close', () => { resolve() }) }))
    const body = req.url.endsWith('/stalled') ? STALLED : req.url.endsWith('/slow') ? SLOW : Buffer.from('{"resourceType":"Patient"}')
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(body.length) })
    res.end(body)
  })
  return closed
}

// Sends the request, then never reads: the socket stays paused, and open.
async function stalledClient (gw: TestGateway, pair: KeyPair, token: string, path: string): Promise<TLSSocket> {
  const port = Number(new URL(gw.url).port)
  const head = [`GET ${path} HTTP/1.1`, 'Host: localhost', `Authorization: Bearer ${token}`, '', ''].join('\r\n')
  return await new Promise<TLSSocket>((resolve, reject) => {
    const socket = tlsConnect({ host: '127.0.0.1', port, servername: 'localhost', ca: gw.pki.ca.cert, cert: pair.cert, key: pair.key }, () => {
      socket.pause()
      socket.write(head)
      resolve(socket)
    })
    socket.once('error', reject)
  })
}

// What a stalled client gets once it reads again: the bytes the kernel still held for it,
// then the end of a connection the gateway has closed.
async function readToEnd (socket: TLSSocket): Promise<Buffer> {
  const chunks: Buffer[] = []
  return await new Promise<Buffer>(resolve => {
    socket.on('data', (chunk: Buffer) => { chunks.push(chunk) })
    socket.once('close', () => { resolve(Buffer.concat(chunks)) })
    socket.on('error', () => {})
    socket.resume()
  })
}

const cuts = (gw: TestGateway): string[] => gw.logs.filter(l => l.includes(CUT_LINE))

const env = { UPSTREAM_BODY_TIMEOUT_MS: String(BODY_TIMEOUT_MS), UPSTREAM_CONNECTIONS: '1', RATE_LIMIT_MAX: '100000', AUDIT_FLUSH_INTERVAL_MS: '20' }
const gw = await startGateway(t, { env })
const { pair } = await gw.register('ws-stalled')
const agent = gw.agent(pair)
const token = await gw.fetchToken(agent)
const auth = { authorization: `Bearer ${token}` }

t.test('a client that stops reading is cut after UPSTREAM_BODY_TIMEOUT_MS, and the upstream connection is freed', async t => {
  const upstream = serve(gw)
  const started = Date.now()
  const socket = await stalledClient(gw, pair, token, '/fhir/Binary/stalled')
  t.teardown(() => { socket.destroy() })

  const cut = await until(5000, () => cuts(gw).length > 0)
  const cutAfter = Date.now() - started
  t.ok(cut, `the gateway cuts the response (after ${cutAfter} ms)`)
  t.ok(cutAfter >= BODY_TIMEOUT_MS, 'not before the timeout')
  const line = JSON.parse(cuts(gw)[0] ?? '{}') as Record<string, unknown>
  t.match(line, { level: 40, msg: CUT_LINE, bodyTimeoutMs: BODY_TIMEOUT_MS }, 'one warn line')
  t.notOk(JSON.stringify(line).includes(token), 'no token in it')
  t.notOk(gw.logs.some(l => l.includes('client closed the request during the response')), 'not told as a client that left')
  const reqId = String(line['reqId'])
  const access = await until(2000, () => gw.logs.some(l => l.includes('"msg":"request"') && l.includes(reqId)))
  t.ok(access, 'the cut request has its access line too (Fastify runs no onResponse for it)')
  const accessLine = JSON.parse(gw.logs.find(l => l.includes('"msg":"request"') && l.includes(reqId)) ?? '{}') as Record<string, unknown>
  t.match(accessLine, { status: 200, code: 'CLIENT_STOPPED_READING' }, 'with the answer\'s status and why it was cut')

  const upstreamClosed = await within(2000, (upstream.get('/fhir/Binary/stalled') ?? Promise.reject(new Error('never reached the upstream'))).then(() => 'closed'))
  t.equal(upstreamClosed, 'closed', 'the upstream request was aborted, its connection closed')

  // UPSTREAM_CONNECTIONS=1: served only once the one pooled connection is free again.
  const next = await within(5000, gw.call(agent, '/fhir/Patient/1', { headers: auth }).then(r => r.status))
  t.equal(next, 200, 'the next request is served')

  const received = await within(5000, readToEnd(socket))
  t.not(received, 'timed out', 'the gateway closed the client connection')
  if (received === 'timed out') return
  const headEnd = received.indexOf('\r\n\r\n')
  const head = received.subarray(0, headEnd).toString()
  t.match(head, /^HTTP\/1\.1 200 /, 'the answer had started')
  const bodyBytes = received.length - headEnd - 4
  t.ok(bodyBytes < STALLED.length, `and was cut short: ${bodyBytes} of ${STALLED.length} bytes`)

  const requestId = /^x-request-id: (\S+)$/im.exec(head)?.[1] ?? 'none'
  let row: Record<string, unknown> | undefined
  await until(5000, async () => {
    [row] = await gw.db.sql<Array<Record<string, unknown>>>`select status, error_code, path, bytes_out from audit_log where request_id = ${requestId}`
    return row !== undefined
  })
  t.match(row, { status: 200, errorCode: 'CLIENT_STOPPED_READING', path: '/fhir/Binary/stalled' }, 'the cut request has its audit row, saying why it was cut')
  t.ok(Number(row?.['bytesOut']) < STALLED.length, `with the bytes that went out (${String(row?.['bytesOut'])})`)
})

t.test('a slow client that keeps reading gets the whole answer, however long it takes', async t => {
  serve(gw)
  const before = cuts(gw).length
  const res = await agent.request({ origin: gw.url, path: '/fhir/Binary/slow', method: 'GET', headers: auth })
  t.equal(res.statusCode, 200)
  const started = Date.now()
  const hash = createHash('sha256')
  let sinceNap = 0
  for await (const chunk of res.body) {
    hash.update(chunk as Buffer)
    sinceNap += (chunk as Buffer).length
    // Slower than the upstream: each nap fills the socket buffers and pauses the upstream,
    // for about the nap each time. A nap is far shorter than the timeout; all of them
    // together are more than twice as long. The reader takes a few MB between naps: the
    // kernel wakes the gateway's writer only once about half its send buffer is free.
    if (sinceNap >= 4 * 1024 * 1024) {
      sinceNap = 0
      await sleep(100)
    }
  }
  const took = Date.now() - started
  t.equal(hash.digest('hex'), createHash('sha256').update(SLOW).digest('hex'), `every byte, in order (${took} ms)`)
  t.ok(took > 2 * BODY_TIMEOUT_MS, 'taking longer than the timeout')
  t.equal(cuts(gw).length, before, 'not cut')
})

t.test('shutdown is not held by a client that stopped reading', async t => {
  const closing = await startGateway(t, { env, db: gw.db, pki: gw.pki })
  serve(closing)
  const closingToken = await closing.fetchToken(closing.agent(pair))
  const socket = await stalledClient(closing, pair, closingToken, '/fhir/Binary/stalled')
  t.teardown(() => { socket.destroy() })
  t.ok(await until(5000, () => closing.upstream.requests.some(r => r.url.endsWith('/stalled'))), 'the answer is streaming')
  await sleep(50)
  const started = Date.now()
  const closed = await within(5000, closing.app.close().then(() => 'closed'))
  t.equal(closed, 'closed', `app.close() returns (after ${Date.now() - started} ms)`)
  t.equal(cuts(closing).length, 1, 'the stalled response was cut')
})

// setTimeout fires after 1 ms for any delay over 2^31 - 1 ms; undici's own bodyTimeout has no
// such ceiling, so a very long UPSTREAM_BODY_TIMEOUT_MS ("never", for bulk exports) worked
// before the stall timer and must still.
t.test('an UPSTREAM_BODY_TIMEOUT_MS beyond setTimeout\'s range does not cut a paused answer at once', async t => {
  const longEnv = { ...env, UPSTREAM_BODY_TIMEOUT_MS: String(2 ** 31) }
  const patient = await startGateway(t, { env: longEnv, db: gw.db, pki: gw.pki })
  const upstream = serve(patient)
  const patientToken = await patient.fetchToken(patient.agent(pair))
  const socket = await stalledClient(patient, pair, patientToken, '/fhir/Binary/stalled')
  t.teardown(() => { socket.destroy() })
  t.ok(await until(5000, () => patient.upstream.requests.some(r => r.url.endsWith('/stalled'))), 'the answer is streaming')
  const closed = upstream.get('/fhir/Binary/stalled') ?? Promise.reject(new Error('never reached the upstream'))
  t.equal(await within(1000, closed.then(() => 'closed')), 'timed out', 'the upstream request is still paused a second later')
  t.equal(cuts(patient).length, 0, 'not cut')
  socket.destroy()
  t.equal(await within(5000, closed.then(() => 'closed')), 'closed', 'and aborted once the client leaves')
})
