import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'

// Seconds; fine at the low end, where a gateway's own cost lives.
const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

// One registry per gateway instance (not prom-client's global), so several instances in one
// process — tests, workers — never mix their numbers.
export function createMetrics () {
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
  return { registry, requests, duration, upstreamDuration, tokensIssued, registryLookups, upstreamTokenFetches, rateLimitFallback, rateLimitRedisUp, tlsReloads, tlsCertificateExpiry }
}

export type Metrics = ReturnType<typeof createMetrics>
