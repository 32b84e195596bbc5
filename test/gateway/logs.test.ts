import t from 'tap'
import { randomBytes } from 'node:crypto'
import { inspect } from 'node:util'
import type { Agent, Dispatcher } from 'undici'
import type { Test } from 'tap'
import { startGateway, TEST_API_KEY } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'

const DB_PASSWORD = 'Pw-' + randomBytes(9).toString('hex')
const COOKIE_VALUE = 'cookie-' + randomBytes(9).toString('hex')
const DPOP_VALUE = 'dpop-' + randomBytes(9).toString('hex')
const XFCC_VALUE = 'xfcc-' + randomBytes(9).toString('hex')
const QUERY_VALUE = 'SecretSmith'

// Raw paths, sent as given (gw.call would let `new URL()` resolve the dot segments).
async function send (gw: TestGateway, agent: Agent, path: string, headers: Record<string, string> = {}, method: Dispatcher.HttpMethod = 'GET'): Promise<number> {
  const res = await agent.request({ origin: gw.url, path, method, headers })
  await res.body.text()
  return res.statusCode
}

// Everything a workstation might send that is a secret or PHI, through every kind of
// answer: proxied, refused by the gateway, and failed upstream.
async function fullFlow (t: Test, gw: TestGateway): Promise<string[]> {
  const { pair } = await gw.register(`ws-logs-${randomBytes(3).toString('hex')}`)
  const agent = gw.agent(pair)
  const token = await gw.fetchToken(agent)
  const secrets = {
    authorization: `Bearer ${token}`,
    cookie: `session=${COOKIE_VALUE}`,
    dpop: DPOP_VALUE,
    'x-api-key': 'attacker'
  }
  t.equal(await send(gw, agent, `/fhir/Patient?name=${QUERY_VALUE}&birthdate=1970-01-01`, secrets), 200, 'proxied search')
  t.equal(await send(gw, agent, `/fhir/Patient/1?_elements=${QUERY_VALUE}`, secrets, 'DELETE'), 200, 'proxied delete')
  t.equal(await send(gw, agent, `/fhir/../admin?name=${QUERY_VALUE}`, secrets), 400, 'refused traversal')
  t.equal(await send(gw, agent, `/nope?name=${QUERY_VALUE}`, secrets), 404, 'unknown route')
  t.equal(await send(gw, agent, `/fhir/Patient?name=${QUERY_VALUE}`, { ...secrets, authorization: `Bearer ${token}x` }), 401, 'tampered token')
  t.equal(await send(gw, agent, `/fhir/%zz?name=${QUERY_VALUE}`, secrets), 400, 'undecodable path')
  t.equal(await send(gw, gw.agent(), `/fhir/Patient?name=${QUERY_VALUE}`, secrets), 401, 'no client certificate')
  t.equal(await send(gw, agent, `/fhir/Patient?name=${QUERY_VALUE}`, { ...secrets, 'x-forwarded-client-cert': XFCC_VALUE }), 400, 'spoofed forwarded certificate')

  gw.upstream.setHandler((_req, res) => { res.destroy() })
  t.equal(await send(gw, agent, `/fhir/Patient?name=${QUERY_VALUE}`, secrets), 502, 'upstream hangs up')
  gw.upstream.setHandler((req, res) => {
    res.writeHead(500, { 'content-type': 'application/fhir+json', 'set-cookie': `upstream=${COOKIE_VALUE}` })
    res.end(JSON.stringify({ resourceType: 'OperationOutcome', url: req.url }))
  })
  t.equal(await send(gw, agent, `/fhir/Patient?name=${QUERY_VALUE}`, secrets), 500, 'upstream 500 passed through')

  t.equal(gw.upstream.requests.filter(r => r.url.includes(QUERY_VALUE)).length, 4, 'the upstream did get the query values')
  return [token, `${token}x`]
}

function assertClean (t: Test, gw: TestGateway, tokens: string[]): void {
  const log = gw.logs.join('')
  t.ok(gw.logs.length > 10, `${gw.logs.length} log lines`)
  for (const line of gw.logs) JSON.parse(line)
  const forbidden: Array<[string, string]> = [
    ['the upstream API key', TEST_API_KEY],
    ['a client cookie value', COOKIE_VALUE],
    ['a DPoP proof', DPOP_VALUE],
    ['a forwarded client cert', XFCC_VALUE],
    ['a query value', QUERY_VALUE],
    ['the database password', DB_PASSWORD],
    ['the key-encryption key', gw.config.tokens.keyEncryptionKey.reveal()]
  ]
  for (const token of tokens) {
    forbidden.push(['an access token', token])
    // a token cut at a line break or truncated is still a token: its signature part alone
    forbidden.push(['an access token signature', token.split('.')[2] ?? token])
  }
  for (const [what, value] of forbidden) t.notOk(log.includes(value), `no ${what} in the log`)
  t.match(log, /\/fhir\/Patient\?name=&birthdate=/, 'the log keeps the parameter names')
  t.match(log, /UPSTREAM_ERROR/, 'the upstream failure is logged')
  t.match(log, /PATH_INVALID/, 'the refusal is logged')
}

t.test('secrets and query values never reach the log (LOG_LEVEL=info)', async t => {
  const gw = await startGateway(t, { env: { DATABASE_URL: `postgres://ehr:${DB_PASSWORD}@127.0.0.1:5432/ehr` } })
  const tokens = await fullFlow(t, gw)
  assertClean(t, gw, tokens)
})

t.test('secrets and query values never reach the log (LOG_LEVEL=trace)', async t => {
  const gw = await startGateway(t, { env: { LOG_LEVEL: 'trace', DATABASE_URL: `postgres://ehr:${DB_PASSWORD}@127.0.0.1:5432/ehr` } })
  const tokens = await fullFlow(t, gw)
  assertClean(t, gw, tokens)
})

t.test('the settled config prints without secrets', async t => {
  const gw = await startGateway(t, { env: { DATABASE_URL: `postgres://ehr:${DB_PASSWORD}@127.0.0.1:5432/ehr` } })
  const kek = gw.config.tokens.keyEncryptionKey.reveal()
  t.equal(gw.config.upstream.apiKey?.reveal(), TEST_API_KEY, 'the key is there to reveal')
  t.equal(gw.config.database.url?.reveal(), `postgres://ehr:${DB_PASSWORD}@127.0.0.1:5432/ehr`)
  const renderings: Array<[string, string]> = [
    ['JSON.stringify', JSON.stringify(gw.config)],
    ['util.inspect', inspect(gw.config, { depth: Infinity, showHidden: true })],
    ['template string of the database url', `${String(gw.config.database.url)}`],
    ['template string of the api key', `${String(gw.config.upstream.apiKey)}`]
  ]
  for (const [how, text] of renderings) {
    t.notOk(text.includes(TEST_API_KEY), `${how}: no API key`)
    t.notOk(text.includes(DB_PASSWORD), `${how}: no database password`)
    t.notOk(text.includes(kek), `${how}: no key-encryption key`)
  }
  t.match(JSON.stringify(gw.config), /postgres:\/\/ehr:\*\*\*@127\.0\.0\.1:5432\/ehr/, 'the database is still identifiable')
})
