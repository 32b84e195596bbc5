import t from 'tap'
import type { Test } from 'tap'
import { generateKeyPairSync, randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { connect as tlsConnect } from 'node:tls'
import { startGateway } from '../helpers/gateway.js'
import { tokenServer } from '../helpers/token-server.js'

type Gateway = Awaited<ReturnType<typeof startGateway>>
type Pair = Awaited<ReturnType<Gateway['register']>>['pair']

// A 4 MB answer for /big, which fills the socket of a client that reads nothing; small otherwise.
function serveBig (gw: Gateway): void {
  const big = Buffer.alloc(4 * 1024 * 1024, 'a')
  gw.upstream.setHandler((req, res) => {
    const body = req.url.includes('big') ? big : Buffer.from('{"resourceType":"Patient"}')
    res.writeHead(200, { 'content-type': 'application/fhir+json', 'content-length': String(body.length) })
    res.end(body)
  })
}

// Sends GET /fhir/Patient/big over raw TLS and goes away 100 ms later, mid-hooks.
async function abandonBig (gw: Gateway, pair: Pair, token: string): Promise<void> {
  const port = Number(new URL(gw.url).port)
  const head = ['GET /fhir/Patient/big HTTP/1.1', 'Host: localhost', `Authorization: Bearer ${token}`, '', ''].join('\r\n')
  await new Promise<void>((resolve, reject) => {
    const socket = tlsConnect({ host: '127.0.0.1', port, servername: 'localhost', ca: gw.pki.ca.cert, cert: pair.cert, key: pair.key }, () => {
      socket.write(head)
      setTimeout(() => { socket.destroy(); resolve() }, 100)
    })
    socket.on('error', reject)
  })
}

// UPSTREAM_CONNECTIONS=1: the next request is served only if the abandoned one freed the
// one pooled connection.
async function nextIsServed (t: Test, gw: Gateway, agent: ReturnType<Gateway['agent']>, token: string): Promise<void> {
  t.comment(`abandoned requests that reached the upstream: ${gw.upstream.requests.filter(r => r.url.includes('big')).length}`)
  const started = Date.now()
  const next = await Promise.race([
    gw.call(agent, '/fhir/Patient/1', { headers: { authorization: `Bearer ${token}` } }).then(r => r.status),
    new Promise<string>(resolve => setTimeout(() => { resolve('hung') }, 5000))
  ])
  t.equal(next, 200, `the next request is served (waited ${Date.now() - started} ms)`)
}

// A client that leaves before the proxy handler registers its 'close'
// listener (here: while the upstream token is being fetched) leaves the proxied request
// paused forever on a destroyed response, holding a pooled upstream connection (found in
// review of the dispatch-based proxy path; it must be refused and never reach the EHR).
t.test('a client gone before the handler registers onClose does not pin an upstream connection', async t => {
  const server = await tokenServer(t, 'smart-at')
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-384' })
  const keyFile = join(t.testdir(), 'smart.key')
  await writeFile(keyFile, privateKey.export({ type: 'pkcs8', format: 'pem' }))
  const gw = await startGateway(t, {
    env: {
      SMART_TOKEN_URL: server.url,
      SMART_CLIENT_ID: 'ehr-gateway-backend-' + randomBytes(4).toString('hex'),
      SMART_PRIVATE_KEY_FILE: keyFile,
      SMART_SCOPE: 'system/Patient.rs',
      RATE_LIMIT_MAX: '100000',
      UPSTREAM_CONNECTIONS: '1'
    }
  })
  server.issue({ delayMs: 300, expiresIn: 300 })
  const { pair } = await gw.register('ws-early-close')
  const agent = gw.agent(pair)
  const token = await gw.fetchToken(agent)
  serveBig(gw)

  // gone while the gateway still waits for its upstream token (300 ms)
  await abandonBig(gw, pair, token)
  // the token arrives, the request goes upstream anyway
  await new Promise(resolve => setTimeout(resolve, 700))
  await nextIsServed(t, gw, agent, token)
})

// Same, with the default static API key: the window is any await in preValidation, here
// the single-use token's replay-store round trip (held up by a lock for the repro).
t.test('a client gone during preValidation (replay store round trip) does not pin an upstream connection', async t => {
  const gw = await startGateway(t, { env: { TOKEN_SINGLE_USE: 'true', RATE_LIMIT_MAX: '100000', UPSTREAM_CONNECTIONS: '1' } })
  const { pair } = await gw.register('ws-early-close-2')
  const agent = gw.agent(pair)
  const first = await gw.fetchToken(agent)
  const second = await gw.fetchToken(agent)
  serveBig(gw)
  const locked = gw.db.sql.begin(async tx => {
    await tx`lock table replay_ids in exclusive mode`
    await new Promise(resolve => setTimeout(resolve, 400))
  })
  await new Promise(resolve => setTimeout(resolve, 50))
  await abandonBig(gw, pair, first)
  await locked
  await new Promise(resolve => setTimeout(resolve, 500))
  await nextIsServed(t, gw, agent, second)
})
