import Fastify from 'fastify'
import type { FastifyInstance } from 'fastify'
import type { Sql } from 'postgres'
import { GatewayError, toProblem } from '../shared/errors.js'
import type { GatewayParts } from './app.js'

// The ops listener: plain HTTP on its own port, for load balancers and Prometheus. It shares
// nothing with the main listener but the parts it reports on.
export function buildOps (parts: GatewayParts, sql: Sql): FastifyInstance {
  const app = Fastify({ logger: false })
  const { metrics, registry, keys, audit } = parts

  app.setNotFoundHandler((request, reply) => reply.code(404).type('application/problem+json')
    .send(toProblem(new GatewayError('NOT_FOUND', [request.method, request.url.split('?')[0]]))))

  app.get('/healthz', async () => ({ status: 'ok' }))

  app.get('/readyz', async (_request, reply) => {
    let problem: string | undefined
    if (!keys.ready) problem = 'no signing key loaded'
    else if (audit.full) problem = 'audit buffer full: the audit database is not taking rows'
    else {
      try {
        await Promise.race([
          sql`select 1`,
          new Promise((_resolve, reject) => setTimeout(() => { reject(new Error('timeout')) }, 1000).unref())
        ])
      } catch {
        problem = 'database unreachable'
      }
    }
    if (problem === undefined) return { status: 'ready' }
    return await reply.code(503).type('application/problem+json').send(toProblem(new GatewayError('NOT_READY', [problem])))
  })

  app.get('/metrics', async (_request, reply) => {
    metrics.registryLookups.set({ result: 'hit' }, registry.stats.hits)
    metrics.registryLookups.set({ result: 'miss' }, registry.stats.misses)
    reply.type(metrics.registry.contentType)
    return await metrics.registry.metrics()
  })
  return app
}
