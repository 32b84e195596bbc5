import t from 'tap'
import type { Test } from 'tap'
import { AggregatorRegistry, Counter as PromCounter, Histogram as PromHistogram, Registry } from 'prom-client'
import { Counter, Histogram } from '../../gateway/metrics.js'

// Our Counter and Histogram must read, to the registry and everything downstream of it, exactly
// as prom-client's own do for the same observations.

const BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
// on a bound, between bounds, above the top, zero, negative, tiny, and sums that round
const DURATIONS = [0.0005, 0.001, 0.0007, 30, 31, 1e6, 0, -1, 1e-9, 0.1, 0.2, 0.3, 0.0025, 2.5000001, 0.049]
// the text format's escapes (backslash, double quote, newline), an empty value, unicode
const AWKWARD = ['/fhir/*', 'a"b', 'back\\slash', 'two\nlines', '', 'ünïcode', '{x="y"}']

interface Pair {
  readonly prom: Registry
  readonly ours: Registry
}

// Both registries fed the same way: the same names and help, the same calls in the same order.
function pair (): Pair & {
  promRequests: PromCounter<'route' | 'status'>, requests: Counter<readonly ['route', 'status']>
  promIssued: PromCounter, issued: Counter
  promDuration: PromHistogram<'route'>, duration: Histogram<readonly ['route']>
  promWrite: PromHistogram, write: Histogram
} {
  const prom = new Registry()
  const ours = new Registry()
  const requests = { name: 'x_requests_total', help: 'Requests, by "route" and status\\ (a\nb)', labelNames: ['route', 'status'] as const }
  const issued = { name: 'x_issued_total', help: 'Tokens issued' }
  const duration = { name: 'x_duration_seconds', help: 'Time to answer', labelNames: ['route'] as const, buckets: BUCKETS }
  const write = { name: 'x_write_seconds', help: 'Time to write', buckets: [0.1, 1, 10] }
  return {
    prom,
    ours,
    promRequests: new PromCounter({ ...requests, labelNames: [...requests.labelNames], registers: [prom] }),
    requests: new Counter({ ...requests, registers: [ours] }),
    promIssued: new PromCounter({ ...issued, registers: [prom] }),
    issued: new Counter({ ...issued, registers: [ours] }),
    promDuration: new PromHistogram({ ...duration, labelNames: [...duration.labelNames], registers: [prom] }),
    duration: new Histogram({ ...duration, registers: [ours] }),
    promWrite: new PromHistogram({ ...write, registers: [prom] }),
    write: new Histogram({ ...write, registers: [ours] })
  }
}

// What a cluster worker sends the primary over IPC (gateway/cluster.ts).
const overIpc = async (registry: Registry): Promise<unknown> => JSON.parse(JSON.stringify(await registry.getMetricsAsJSON())) as unknown

async function sameExposition (t: Test, { prom, ours }: Pair, what: string): Promise<void> {
  t.equal(await ours.metrics(), await prom.metrics(), `${what}: text`)
  t.strictSame(await overIpc(ours), await overIpc(prom), `${what}: JSON`)
}

t.test('exposition is identical to prom-client for the same observations', async t => {
  const p = pair()
  await sameExposition(t, p, 'before any observation (unlabelled series read 0)')

  for (const [i, route] of AWKWARD.entries()) {
    for (const [j, seconds] of DURATIONS.entries()) {
      const status = String([200, 404, 502][(i + j) % 3])
      p.promRequests.labels(route, status).inc()
      p.requests.labels(route, status).inc()
      p.promDuration.labels(route).observe(seconds)
      p.duration.labels(route).observe(seconds)
      p.promWrite.observe(seconds)
      p.write.observe(seconds)
    }
  }
  p.promIssued.inc()
  p.issued.inc()
  p.promIssued.inc(2.5)
  p.issued.inc(2.5)
  p.promRequests.inc({ route: '/v1/token', status: '200' }, 3)
  p.requests.labels('/v1/token', '200').inc(3)
  await sameExposition(t, p, 'after')

  const text = await p.ours.metrics()
  t.match(text, 'x_duration_seconds_bucket{le="0.0005",route="a\\"b"} ', 'a double quote is escaped')
  t.match(text, 'x_requests_total{route="two\\nlines",status=', 'a newline is escaped')
  t.match(text, 'x_requests_total{route="back\\\\slash",status=', 'a backslash is escaped')
  t.match(text, 'x_duration_seconds_bucket{le="+Inf",route="/fhir/*"} 15\n', '+Inf counts every observation')
  t.match(text, 'x_duration_seconds_count{route="/fhir/*"} 15\n')
})

t.test('AggregatorRegistry sums workers of ours as it does workers of prom-client', async t => {
  const workers = [pair(), pair()]
  workers.forEach((w, n) => {
    for (const seconds of DURATIONS.slice(n)) {
      w.promDuration.labels(n === 0 ? '/fhir/*' : '/v1/token').observe(seconds)
      w.duration.labels(n === 0 ? '/fhir/*' : '/v1/token').observe(seconds)
      w.promDuration.labels('/fhir/*').observe(seconds * 2)
      w.duration.labels('/fhir/*').observe(seconds * 2)
      w.promRequests.labels('/fhir/*', '200').inc()
      w.requests.labels('/fhir/*', '200').inc()
    }
    w.promIssued.inc(n + 1)
    w.issued.inc(n + 1)
  })
  const promAggregated = AggregatorRegistry.aggregate(await Promise.all(workers.map(async w => await overIpc(w.prom))) as Parameters<typeof AggregatorRegistry.aggregate>[0])
  const ours = AggregatorRegistry.aggregate(await Promise.all(workers.map(async w => await overIpc(w.ours))) as Parameters<typeof AggregatorRegistry.aggregate>[0])
  const text = await ours.metrics()
  t.equal(text, await promAggregated.metrics())
  t.match(text, /^x_issued_total 3$/m)
  t.match(text, /^x_requests_total\{route="\/fhir\/\*",status="200"\} 29$/m)
})

t.test('labels() gives one series per label set, shared by every caller', async t => {
  const registry = new Registry()
  const requests = new Counter({ name: 'c_total', help: 'c', labelNames: ['route', 'method'] as const, registers: [registry] })
  const held = requests.labels('/a', 'GET')
  t.equal(requests.labels('/a', 'GET'), held, 'the same values, the same series')
  t.not(requests.labels('/a', 'POST'), held)
  t.not(requests.labels('/aGET', ''), held, 'values are not concatenated into one key')
  t.not(requests.labels('', '/aGET'), requests.labels('/aGET', ''))

  // Requests in flight at once, each feeding its label set between awaits.
  const routes = ['/a', '/b', '/c']
  await Promise.all(Array.from({ length: 300 }, async (_, i) => {
    await new Promise(resolve => setImmediate(resolve))
    const series = requests.labels(routes[i % 3] as string, 'GET')
    await new Promise(resolve => setImmediate(resolve))
    series.inc()
    held.inc(0)
  }))
  const text = await registry.metrics()
  for (const route of routes) t.match(text, `c_total{route="${route}",method="GET"} 100\n`)
  t.match(text, 'c_total{route="/a",method="POST"} 0\n', 'a series is listed from its first labels() on')

  const other = new Registry()
  const elsewhere = new Counter({ name: 'c_total', help: 'c', labelNames: ['route', 'method'] as const, registers: [other] })
  elsewhere.labels('/a', 'GET').inc(7)
  t.match(await registry.metrics(), 'c_total{route="/a",method="GET"} 100\n', 'another registry\'s metric of the same name counts apart')
})

t.test('resetMetrics zeroes the series; a series held from before keeps counting', async t => {
  const registry = new Registry()
  const counter = new Counter({ name: 'c_total', help: 'c', labelNames: ['route'] as const, registers: [registry] })
  const histogram = new Histogram({ name: 'h_seconds', help: 'h', labelNames: ['route'] as const, buckets: [1, 2], registers: [registry] })
  const heldCount = counter.labels('/a')
  const heldTime = histogram.labels('/a')
  heldCount.inc(5)
  heldTime.observe(1.5)
  registry.resetMetrics()
  t.match(await registry.metrics(), 'c_total{route="/a"} 0\n')
  t.match(await registry.metrics(), 'h_seconds_bucket{le="2",route="/a"} 0\n')
  t.match(await registry.metrics(), 'h_seconds_sum{route="/a"} 0\n')
  heldCount.inc()
  heldTime.observe(0.5)
  const text = await registry.metrics()
  t.match(text, 'c_total{route="/a"} 1\n')
  t.match(text, 'h_seconds_bucket{le="1",route="/a"} 1\n')
  t.match(text, 'h_seconds_count{route="/a"} 1')
})

t.test('a bad value is dropped, not thrown into a request hook', async t => {
  const registry = new Registry()
  const counter = new Counter({ name: 'c_total', help: 'c', registers: [registry] })
  const histogram = new Histogram({ name: 'h_seconds', help: 'h', buckets: [1], registers: [registry] })
  for (const bad of [-1, NaN, Infinity]) counter.inc(bad)
  // a histogram takes negative values (prom-client's does too)
  for (const bad of [NaN, Infinity, -Infinity]) histogram.observe(bad)
  counter.inc()
  histogram.observe(0.5)
  const text = await registry.metrics()
  t.match(text, /^c_total 1$/m)
  t.match(text, /^h_seconds_sum 0.5$/m)
  t.match(text, /^h_seconds_count 1$/m)
})

t.test('definitions prom-client refuses are refused', async t => {
  const registers: Registry[] = []
  t.throws(() => new Counter({ name: 'bad-name', help: 'x', registers }), /invalid metric name/)
  t.throws(() => new Counter({ name: 'x_total', help: '', registers }), /no help/)
  t.throws(() => new Counter({ name: 'x_total', help: 'x', labelNames: ['bad-label'] as const, registers }), /invalid label name/)
  t.throws(() => new Counter({ name: 'x_total', help: 'x', labelNames: ['a', 'a'] as const, registers }), /repeats a label name/)
  t.throws(() => new Histogram({ name: 'x_seconds', help: 'x', labelNames: ['le'] as const, buckets: [1], registers }), /invalid label name 'le'/)
  t.throws(() => new Histogram({ name: 'x_seconds', help: 'x', buckets: [2, 1], registers }), /increasing/)
  t.throws(() => new Histogram({ name: 'x_seconds', help: 'x', buckets: [1, Infinity], registers }), /finite/)
  const registry = new Registry()
  new Counter({ name: 'x_total', help: 'x', registers: [registry] })
  t.throws(() => new Counter({ name: 'x_total', help: 'x', registers: [registry] }), /already been registered/)

  const labelled = new Counter({ name: 'y_total', help: 'y', labelNames: ['a', 'b'] as const, registers })
  const untyped = labelled as unknown as { labels: (...values: string[]) => unknown }
  t.throws(() => untyped.labels('1'), /takes 2 label values \(a, b\), not 1/)
  t.throws(() => untyped.labels('1', '2', '3'), /not 3/)
})
