import t from 'tap'
import type { AddressInfo } from 'node:net'
import postgres from 'postgres'
import type { Sql } from 'postgres'
import type { Test } from 'tap'
import { request } from 'undici'
import { buildOps } from '../../gateway/ops.js'
import { startGateway } from '../helpers/gateway.js'
import { closedPort } from '../helpers/assert.js'


const gw = await startGateway(t)

async function startOps (t: Test, sql: Sql): Promise<string> {
  const ops = buildOps(gw.app.gateway, sql)
  await ops.listen({ host: '127.0.0.1', port: 0 })
  t.teardown(async () => { await ops.close() })
  const { port } = ops.server.address() as AddressInfo
  return `http://127.0.0.1:${port}`
}

async function get (url: string): Promise<{ status: number, type: string, text: string }> {
  const res = await request(url)
  return { status: res.statusCode, type: String(res.headers['content-type']), text: await res.body.text() }
}

// `name{a="x",b="y"} 3` → the value, when a sample has (at least) these labels.
function sample (text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split('\n')) {
    if (!line.startsWith(name + '{') && !line.startsWith(name + ' ')) continue
    const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`)
    if (want.every(w => line.includes(w))) return Number(line.slice(line.lastIndexOf(' ') + 1))
  }
  return undefined
}

const base = await startOps(t, gw.db.sql)

t.test('/healthz answers 200', async t => {
  const res = await get(`${base}/healthz`)
  t.equal(res.status, 200)
  t.match(JSON.parse(res.text), { status: 'ok' })
})

t.test('/readyz answers 200 when the database is reachable and a key is loaded', async t => {
  const res = await get(`${base}/readyz`)
  t.equal(res.status, 200, res.text)
  t.match(JSON.parse(res.text), { status: 'ready' })
})

t.test('/metrics is Prometheus text with request, latency and token series', async t => {
  const { pair } = await gw.register('ws-ops')
  const agent = gw.agent(pair)
  const token = await gw.fetchToken(agent)
  const auth = { authorization: `Bearer ${token}` }
  for (let i = 0; i < 3; i++) {
    const res = await gw.call(agent, `/fhir/Patient/${i}`, { headers: auth })
    t.equal(res.status, 200, res.text)
  }
  const refused = await agent.request({ origin: gw.url, path: '/fhir/../admin', method: 'GET', headers: auth })
  await refused.body.text()
  t.equal(refused.statusCode, 400)
  const missing = await gw.call(agent, '/nope')
  t.equal(missing.status, 404)

  const res = await get(`${base}/metrics`)
  t.equal(res.status, 200)
  t.match(res.type, /^text\/plain; version=0\.0\.4/)
  t.match(res.text, /# TYPE ehr_gateway_requests_total counter/)
  t.equal(sample(res.text, 'ehr_gateway_requests_total', { route: '/fhir/*', method: 'GET', status: '200', code: '' }), 3, 'proxied 200s')
  t.equal(sample(res.text, 'ehr_gateway_requests_total', { route: '/fhir/*', method: 'GET', status: '400', code: 'PATH_INVALID' }), 1, 'refused with its code')
  t.equal(sample(res.text, 'ehr_gateway_requests_total', { route: '/v1/token', method: 'POST', status: '200' }), 1, 'token request')
  t.equal(sample(res.text, 'ehr_gateway_requests_total', { status: '404', code: 'NOT_FOUND' }), 1, 'unknown route')
  t.match(res.text, /ehr_gateway_request_duration_seconds_bucket\{le="[^"]+",route="\/fhir\/\*"\} \d+/)
  t.equal(sample(res.text, 'ehr_gateway_request_duration_seconds_count', { route: '/fhir/*' }), 4)
  t.equal(sample(res.text, 'ehr_gateway_tokens_issued_total', {}), 1)
  t.match(res.text, /ehr_gateway_upstream_duration_seconds_bucket\{le="[^"]+",status="200"\} \d+/)
  t.match(res.text, /ehr_gateway_registry_lookups\{result="(hit|miss)"\} \d+/)
  t.match(res.text, /ehr_gateway_process_/, 'process metrics under our prefix')
  t.notMatch(res.text, /\/fhir\/Patient\/\d/, 'no raw paths as label values')
})

t.test('/readyz answers 503 problem+json when the database is unreachable', async t => {
  const port = await closedPort()
  const dead = postgres(`postgres://postgres@127.0.0.1:${port}/x`, { connect_timeout: 1, max: 1, onnotice: () => {} })
  t.teardown(async () => { await dead.end({ timeout: 0 }) })
  const url = await startOps(t, dead)
  const started = Date.now()
  const res = await get(`${url}/readyz`)
  t.equal(res.status, 503, res.text)
  t.match(res.type, /^application\/problem\+json/)
  const body = JSON.parse(res.text) as Record<string, unknown>
  t.match(body, { code: 'NOT_READY', status: 503, detail: 'database unreachable' })
  t.notMatch(res.text, String(port), 'no internal address')
  t.ok(Date.now() - started < 3000, 'answers promptly')
  const health = await get(`${url}/healthz`)
  t.equal(health.status, 200, 'alive even when not ready')
})
