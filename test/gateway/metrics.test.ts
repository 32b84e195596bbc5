import type { AddressInfo } from 'node:net'
import t from 'tap'
import { request } from 'undici'
import { buildOps } from '../../gateway/ops.js'
import { startGateway } from '../helpers/gateway.js'

interface Sample { readonly name: string, readonly labels: Record<string, string>, readonly value: number }
interface Exposition { readonly types: Map<string, string>, readonly samples: Sample[] }

// Prometheus text format 0.0.4: `# TYPE name kind`, then `name{label="v",...} value`.
// Strict enough that a malformed line fails the test.
function parseExposition (text: string): Exposition {
  const types = new Map<string, string>()
  const samples: Sample[] = []
  for (const line of text.split('\n')) {
    if (line === '') continue
    const type = /^# TYPE ([a-zA-Z_:][\w:]*) (counter|gauge|histogram|summary|untyped)$/.exec(line)
    if (type !== null) { types.set(type[1] as string, type[2] as string); continue }
    if (line.startsWith('# HELP ')) continue
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (-?[\d.e+-]+|NaN|[+-]Inf)$/.exec(line)
    if (m === null) throw new Error(`not Prometheus text: ${line}`)
    const labels: Record<string, string> = {}
    for (const [, k, v] of (m[2] ?? '').matchAll(/([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"/g)) labels[k as string] = v as string
    samples.push({ name: m[1] as string, labels, value: Number(m[3]) })
  }
  return { types, samples }
}

function value (e: Exposition, name: string, labels: Record<string, string> = {}): number | undefined {
  return e.samples.find(s => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))?.value
}

t.test('/metrics on the ops port: requests, latency, upstream pool, tokens, audit, registry, process', async t => {
  const gw = await startGateway(t, { env: { AUDIT_FLUSH_INTERVAL_MS: '5' } })
  const ops = buildOps(gw.app.gateway, gw.db.sql)
  await ops.listen({ host: '127.0.0.1', port: 0 })
  t.teardown(async () => { await ops.close() })
  const base = `http://127.0.0.1:${(ops.server.address() as AddressInfo).port}`

  const { pair } = await gw.register('ws-metrics')
  const agent = gw.agent(pair)
  const token = await gw.fetchToken(agent)
  const auth = { authorization: `Bearer ${token}` }
  for (let i = 0; i < 3; i++) t.equal((await gw.call(agent, `/fhir/Patient/${i}`, { headers: auth })).status, 200)
  t.equal((await gw.call(gw.agent(await gw.pki.ca.issueClient({ commonName: 'nobody' })), '/v1/token', { method: 'POST' })).status, 403)
  await new Promise(resolve => setTimeout(resolve, 100)) // the audit batch is written

  const res = await request(`${base}/metrics`)
  t.equal(res.statusCode, 200)
  t.match(String(res.headers['content-type']), /^text\/plain; version=0\.0\.4/)
  const e = parseExposition(await res.body.text())

  t.equal(value(e, 'ehr_gateway_requests_total', { route: '/fhir/*', status: '200', code: '' }), 3)
  t.equal(value(e, 'ehr_gateway_requests_total', { route: '/v1/token', status: '403', code: 'MACHINE_NOT_REGISTERED' }), 1)
  t.equal(e.types.get('ehr_gateway_request_duration_seconds'), 'histogram')
  t.equal(value(e, 'ehr_gateway_request_duration_seconds_count', { route: '/fhir/*' }), 3)
  t.equal(value(e, 'ehr_gateway_upstream_duration_seconds_count', { status: '200' }), 3, 'upstream latency fed')

  t.equal(value(e, 'ehr_gateway_tokens_issued_total'), 1)
  t.equal(value(e, 'ehr_gateway_token_refusals_total', { code: 'MACHINE_NOT_REGISTERED' }), 1)

  t.equal(e.types.get('ehr_gateway_upstream_connections'), 'gauge')
  t.ok((value(e, 'ehr_gateway_upstream_connections', { state: 'connected' }) ?? 0) >= 1, 'a pooled keep-alive connection')
  t.equal(value(e, 'ehr_gateway_upstream_connections', { state: 'running' }), 0, 'none in use now')
  t.equal(value(e, 'ehr_gateway_upstream_connections', { state: 'pending' }), 0, 'none queued')

  t.equal(value(e, 'ehr_gateway_audit_buffer_rows'), 0)
  t.equal(value(e, 'ehr_gateway_audit_rows_written_total'), 5, 'token, 3 proxied, 1 refused')
  t.equal(value(e, 'ehr_gateway_audit_write_failures_total'), 0)
  t.equal(value(e, 'ehr_gateway_audit_refusals_total'), 0)
  t.equal(value(e, 'ehr_gateway_audit_rows_unwritten_total'), 0)
  t.ok((value(e, 'ehr_gateway_audit_write_duration_seconds_count', { result: 'written' }) ?? 0) >= 1)

  t.ok((value(e, 'ehr_gateway_registry_lookups', { result: 'hit' }) ?? 0) >= 3, 'registry cache hits')
  t.ok((value(e, 'ehr_gateway_process_cpu_seconds_total') ?? 0) > 0, 'process metrics')
  t.ok((value(e, 'ehr_gateway_nodejs_eventloop_lag_seconds') ?? -1) >= 0)
})
