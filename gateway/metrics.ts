import { Gauge, Registry, collectDefaultMetrics } from 'prom-client'
import type { Metric } from 'prom-client'

// Seconds; fine at the low end, where a gateway's own cost lives.
const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

// Counters and histograms fed on the request path. prom-client's own hash and validate the
// label object on every inc()/observe(), even through a labels() child: about 3 µs per
// request (test/bench/micro.ts). Here labels(...values) walks one Map per label to a series
// made on first use, and inc()/observe() are a few number operations on it. They hand the
// registry the objects prom-client's Counter and Histogram do, so its text rendering
// (escaping included), getMetricsAsJSON and AggregatorRegistry (gateway/cluster.ts) work on
// them unchanged. Gauges, set at scrape time or rarely, stay prom-client's.

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/

export type LabelValues<N extends readonly string[]> = { readonly [K in keyof N]: string }
type SeriesLabels = Readonly<Record<string, string>>

export interface MetricOptions<N extends readonly string[]> {
  readonly name: string
  readonly help: string
  readonly labelNames?: N
  readonly registers: readonly Registry[]
}

interface LabelNode<S> {
  readonly next: Map<string, LabelNode<S>>
  series?: S
}

abstract class Family<N extends readonly string[], S> {
  readonly name: string
  readonly help: string
  readonly labelNames: N
  // how AggregatorRegistry combines the workers' series
  readonly aggregator = 'sum'
  // in creation order, which is the order of the exposition
  protected readonly series: Array<{ readonly labels: SeriesLabels, readonly series: S }> = []
  readonly #index: LabelNode<S> = { next: new Map() }

  constructor (options: MetricOptions<N>, reserved: readonly string[] = []) {
    this.name = options.name
    this.help = options.help
    this.labelNames = options.labelNames ?? ([] as readonly string[] as N)
    if (!METRIC_NAME.test(this.name)) throw new Error(`invalid metric name '${this.name}'`)
    if (this.help === '') throw new Error(`metric '${this.name}' has no help`)
    for (const label of this.labelNames) {
      if (!LABEL_NAME.test(label) || reserved.includes(label)) throw new Error(`metric '${this.name}': invalid label name '${label}'`)
    }
    if (new Set(this.labelNames).size !== this.labelNames.length) throw new Error(`metric '${this.name}' repeats a label name`)
    // prom-client's Registry reads only name, get() and reset() of what it holds
    // (lib/registry.js); its types admit only its own metric classes.
    for (const registry of options.registers) registry.registerMetric(this as unknown as Metric)
  }

  // The series for these label values (in labelNames order), made on first use; it stays
  // in the exposition from then on, as prom-client's do once fed.
  labels (...values: LabelValues<N>): S {
    let node = this.#index
    for (const value of values) {
      const next = node.next.get(value)
      if (next === undefined) return this.#add(values)
      node = next
    }
    return node.series ?? this.#add(values)
  }

  #add (values: readonly string[]): S {
    if (values.length !== this.labelNames.length) {
      throw new Error(`metric '${this.name}' takes ${this.labelNames.length} label values (${this.labelNames.join(', ')}), not ${values.length}`)
    }
    let node = this.#index
    for (const value of values) {
      let next = node.next.get(value)
      if (next === undefined) {
        next = { next: new Map() }
        node.next.set(value, next)
      }
      node = next
    }
    const labels: Record<string, string> = {}
    this.labelNames.forEach((name, i) => { labels[name] = values[i] as string })
    const series = this.create()
    node.series = series
    this.series.push({ labels: Object.freeze(labels), series })
    return series
  }

  protected abstract create (): S
}

export class CounterSeries {
  value = 0

  // A counter only goes up; a bad amount is a bug of ours, dropped rather than thrown from a
  // request hook.
  inc (amount = 1): void {
    if (amount >= 0 && amount < Infinity) this.value += amount
  }
}

export class Counter<N extends readonly string[] = readonly []> extends Family<N, CounterSeries> {
  readonly type = 'counter'

  constructor (options: MetricOptions<N>) {
    super(options)
    // An unlabelled counter reads 0 before its first inc(), as prom-client's does.
    if (this.labelNames.length === 0) this.labels(...([] as readonly string[] as LabelValues<N>))
  }

  inc (this: Counter<readonly []>, amount = 1): void {
    this.labels().inc(amount)
  }

  protected override create (): CounterSeries {
    return new CounterSeries()
  }

  async get (): Promise<{ name: string, help: string, type: 'counter', aggregator: 'sum', values: Array<{ value: number, labels: SeriesLabels }> }> {
    return {
      name: this.name,
      help: this.help,
      type: this.type,
      aggregator: this.aggregator,
      values: this.series.map(({ labels, series }) => ({ value: series.value, labels }))
    }
  }

  // Registry#resetMetrics: the series stay (at 0), so none that a caller holds is orphaned.
  reset (): void {
    for (const { series } of this.series) series.value = 0
  }
}

export class HistogramSeries {
  // per bucket, not cumulative; the last slot is above the top bound (only in +Inf)
  readonly counts: Float64Array
  sum = 0
  count = 0
  readonly #bounds: Float64Array

  constructor (bounds: Float64Array) {
    this.#bounds = bounds
    this.counts = new Float64Array(bounds.length + 1)
  }

  // A value that is not a number (a bug of ours) is dropped rather than thrown from a
  // request hook: it would make the sum NaN for good.
  observe (value: number): void {
    if (!Number.isFinite(value)) return
    const bounds = this.#bounds
    let i = 0
    while (i < bounds.length && value > (bounds[i] as number)) i++
    this.counts[i]++
    this.sum += value
    this.count++
  }

  reset (): void {
    this.counts.fill(0)
    this.sum = 0
    this.count = 0
  }
}

export interface HistogramOptions<N extends readonly string[]> extends MetricOptions<N> {
  // upper bounds, increasing; +Inf is implied
  readonly buckets: readonly number[]
}

interface HistogramValue {
  value: number
  metricName: string
  exemplar?: null
  labels: Record<string, string | number>
}

export class Histogram<N extends readonly string[] = readonly []> extends Family<N, HistogramSeries> {
  readonly type = 'histogram'
  readonly #buckets: readonly number[]
  readonly #bounds: Float64Array

  constructor (options: HistogramOptions<N>) {
    super(options, ['le'])
    const { buckets } = options
    if (buckets.some((b, i) => !Number.isFinite(b) || (i > 0 && b <= (buckets[i - 1] as number)))) {
      throw new Error(`metric '${this.name}': buckets must be finite and increasing`)
    }
    this.#buckets = Object.freeze([...buckets])
    this.#bounds = Float64Array.from(buckets)
    // An unlabelled histogram lists its (empty) buckets before the first observe(), as
    // prom-client's does.
    if (this.labelNames.length === 0) this.labels(...([] as readonly string[] as LabelValues<N>))
  }

  observe (this: Histogram<readonly []>, value: number): void {
    this.labels().observe(value)
  }

  protected override create (): HistogramSeries {
    return new HistogramSeries(this.#bounds)
  }

  // As prom-client's Histogram#get: per series the cumulative buckets (le first among the
  // labels), +Inf, _sum, _count.
  async get (): Promise<{ name: string, help: string, type: 'histogram', aggregator: 'sum', values: HistogramValue[] }> {
    const bucket = `${this.name}_bucket`
    const values: HistogramValue[] = []
    for (const { labels, series } of this.series) {
      let cumulative = 0
      this.#buckets.forEach((le, i) => {
        cumulative += series.counts[i] as number
        values.push({ value: cumulative, metricName: bucket, exemplar: null, labels: { le, ...labels } })
      })
      values.push({ value: series.count, metricName: bucket, exemplar: null, labels: { le: '+Inf', ...labels } })
      values.push({ value: series.sum, metricName: `${this.name}_sum`, labels: { ...labels } })
      values.push({ value: series.count, metricName: `${this.name}_count`, labels: { ...labels } })
    }
    return { name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values }
  }

  // Registry#resetMetrics: the series stay (empty), so none that a caller holds is orphaned.
  reset (): void {
    for (const { series } of this.series) series.reset()
  }
}

// undici Pool#stats, read at scrape time.
export interface PoolStats {
  readonly connected: number
  readonly free: number
  readonly pending: number
  readonly queued: number
  readonly running: number
}

// What the gauges read when Prometheus scrapes; set by buildGateway once the parts exist.
export interface MetricSources {
  upstreamPool?: () => PoolStats | undefined
  auditDepth?: () => number
}

// Other parts (replay store, Redis rate limit) add their series to `registry` beside the
// code they measure: `new Counter({ ..., registers: [metrics.registry] })`, with the Counter
// and Histogram above.
// One registry per gateway instance (not prom-client's global), so several instances in one
// process — tests, workers — never mix their numbers.
export function createMetrics (sources: MetricSources = {}) {
  const registry = new Registry()
  collectDefaultMetrics({ register: registry, prefix: 'ehr_gateway_' })
  const requests = new Counter({
    name: 'ehr_gateway_requests_total',
    help: 'Requests answered, by route, method, status and error code',
    labelNames: ['route', 'method', 'status', 'code'] as const,
    registers: [registry]
  })
  const duration = new Histogram({
    name: 'ehr_gateway_request_duration_seconds',
    help: 'Time from request to response, by route',
    labelNames: ['route'] as const,
    buckets: LATENCY_BUCKETS,
    registers: [registry]
  })
  const upstreamDuration = new Histogram({
    name: 'ehr_gateway_upstream_duration_seconds',
    help: 'Time until the EHR answered with headers',
    labelNames: ['status'] as const,
    buckets: LATENCY_BUCKETS,
    registers: [registry]
  })
  const tokensIssued = new Counter({
    name: 'ehr_gateway_tokens_issued_total',
    help: 'Access tokens issued',
    registers: [registry]
  })
  const registryLookups = new Gauge({
    name: 'ehr_gateway_registry_lookups',
    help: 'Machine registry lookups since start, by cache result',
    labelNames: ['result'] as const,
    registers: [registry]
  })
  const upstreamTokenFetches = new Counter({
    name: 'ehr_gateway_upstream_token_fetches_total',
    help: 'Upstream access-token fetches, by token source mode and result (ok, error)',
    labelNames: ['mode', 'result'] as const,
    registers: [registry]
  })
  const rateLimitFallback = new Counter({
    name: 'ehr_gateway_rate_limit_fallback_total',
    help: 'Requests counted by the per-instance fallback limit because Redis was unreachable',
    registers: [registry]
  })
  const rateLimitRedisUp = new Gauge({
    name: 'ehr_gateway_rate_limit_redis_up',
    help: '1 while rate limits are shared through Redis (REDIS_URL), 0 while falling back',
    registers: [registry]
  })
  const tokensRefused = new Counter({
    name: 'ehr_gateway_token_refusals_total',
    help: 'Token requests refused, by error code',
    labelNames: ['code'] as const,
    registers: [registry]
  })
  new Gauge({
    name: 'ehr_gateway_upstream_connections',
    help: 'Upstream pool connections by state (undici Pool stats: connected, free, running = in use, pending = queued requests, queued)',
    labelNames: ['state'] as const,
    registers: [registry],
    collect () {
      const stats = sources.upstreamPool?.()
      if (stats === undefined) return
      for (const state of ['connected', 'free', 'pending', 'queued', 'running'] as const) this.set({ state }, stats[state])
    }
  })
  new Gauge({
    name: 'ehr_gateway_audit_buffer_rows',
    help: 'Audit rows waiting to be written to Postgres',
    registers: [registry],
    collect () { this.set(sources.auditDepth?.() ?? 0) }
  })
  const auditWriteDuration = new Histogram({
    name: 'ehr_gateway_audit_write_duration_seconds',
    help: 'Time to write one batch of audit rows, by result',
    labelNames: ['result'] as const,
    buckets: LATENCY_BUCKETS,
    registers: [registry]
  })
  const auditRowsWritten = new Counter({
    name: 'ehr_gateway_audit_rows_written_total',
    help: 'Audit rows written to Postgres',
    registers: [registry]
  })
  const auditWriteFailures = new Counter({
    name: 'ehr_gateway_audit_write_failures_total',
    help: 'Audit batch writes that failed (the rows stay buffered and are retried)',
    registers: [registry]
  })
  const auditRowsUnwritten = new Counter({
    name: 'ehr_gateway_audit_rows_unwritten_total',
    help: 'Audit rows still unwritten when shutdown gave up (they are in the error log)',
    registers: [registry]
  })
  const auditRefusals = new Counter({
    name: 'ehr_gateway_audit_refusals_total',
    help: 'Requests refused with AUDIT_UNAVAILABLE because the audit buffer was full',
    registers: [registry]
  })
  const tlsReloads = new Counter({
    name: 'ehr_gateway_tls_reloads_total',
    help: 'Reloads of the TLS certificate, key and client CA, by result (reloaded, unchanged, failed: the previous files stay in use)',
    labelNames: ['result'] as const,
    registers: [registry]
  })
  const tlsCertificateExpiry = new Gauge({
    name: 'ehr_gateway_tls_certificate_expiry_timestamp_seconds',
    help: 'notAfter of the server certificate being served, in seconds since the epoch',
    registers: [registry],
    // The same certificate in every worker: report it once, not summed over workers.
    aggregator: 'max'
  })
  return {
    registry, requests, duration, upstreamDuration, tokensIssued, tokensRefused, registryLookups,
    upstreamTokenFetches, rateLimitFallback, rateLimitRedisUp, auditWriteDuration, auditRowsWritten,
    auditWriteFailures, auditRowsUnwritten, auditRefusals, tlsReloads, tlsCertificateExpiry
  }
}

export type Metrics = ReturnType<typeof createMetrics>
