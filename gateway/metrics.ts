import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'

// Seconds; fine at the low end, where a gateway's own cost lives.
const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

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
// code they measure: `new Counter({ ..., registers: [metrics.registry] })`.
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
