// The baseline a user would otherwise run: @fastify/http-proxy behind Fastify over the same
// mutual TLS (client certificate required and verified against the same CA), with no
// registry, token, rate limit, security headers or logging. Its own process, so its CPU
// time is its own. Env: BENCH_CERT, BENCH_KEY, BENCH_CA (files), BENCH_UPSTREAM (origin).
// Prints `{"port":…}` on stdout once listening.
import { readFileSync } from 'node:fs'
import proxy from '@fastify/http-proxy'
import Fastify from 'fastify'

const env = (name: string): string => {
  const value = process.env[name]
  if (value === undefined) throw new Error(`${name} is required`)
  return value
}

const app = Fastify({
  https: { cert: readFileSync(env('BENCH_CERT')), key: readFileSync(env('BENCH_KEY')), ca: readFileSync(env('BENCH_CA')), requestCert: true, rejectUnauthorized: true }
})
await app.register(proxy, { upstream: env('BENCH_UPSTREAM'), prefix: '/fhir', rewritePrefix: '/fhir' })
await app.listen({ host: '127.0.0.1', port: 0 })
process.stdout.write(JSON.stringify({ port: (app.server.address() as { port: number }).port }) + '\n')
process.once('SIGTERM', () => { void app.close() })
