import Fastify, { LogController } from 'fastify'
import type { FastifyInstance, FastifyServerOptions } from 'fastify'
import type { Sql } from 'postgres'
import { GatewayError, toProblem } from '../shared/errors.js'
import type { GatewayParts } from './app.js'

// What the ops endpoints report on: one gateway in this process, or (gateway/cluster.ts)
// the workers of a cluster primary, asked over IPC.
export interface OpsSource {
  // undefined when ready, else why not
  ready(): Promise<string | undefined>
  metrics(): Promise<{ readonly contentType: string, readonly text: string }>
}

export async function readinessProblem (parts: GatewayParts, sql: Sql): Promise<string | undefined> {
  if (!parts.keys.ready) return 'no signing key loaded'
  if (parts.audit.full) return 'audit buffer full: the audit database is not taking rows'
  try {
    await Promise.race([
      sql`select 1`,
      new Promise((_resolve, reject) => setTimeout(() => { reject(new Error('timeout')) }, 1000).unref())
    ])
  } catch {
    return 'database unreachable'
  }
  return undefined
}

// Brings the sampled values up to date before the registry is read.
export function refreshMetrics (parts: GatewayParts): GatewayParts['metrics']['registry'] {
  const { metrics, registry } = parts
  metrics.registryLookups.set({ result: 'hit' }, registry.stats.hits)
  metrics.registryLookups.set({ result: 'miss' }, registry.stats.misses)
  return metrics.registry
}

export function localOps (parts: GatewayParts, sql: Sql): OpsSource {
  return {
    ready: async () => await readinessProblem(parts, sql),
    metrics: async () => {
      const registry = refreshMetrics(parts)
      return { contentType: registry.contentType, text: await registry.metrics() }
    }
  }
}

// The ops listener: plain HTTP on its own port, for load balancers and Prometheus. It shares
// nothing with the main listener but the parts it reports on.
export function buildOps (parts: GatewayParts, sql: Sql): FastifyInstance {
  return buildOpsServer(localOps(parts, sql))
}

export function buildOpsServer (source: OpsSource, logger: FastifyServerOptions['logger'] = false): FastifyInstance {
  const app = Fastify({ logger, logController: new LogController({ disableRequestLogging: true }) })

  app.setNotFoundHandler((request, reply) => reply.code(404).type('application/problem+json')
    .send(toProblem(new GatewayError('NOT_FOUND', [request.method, request.url.split('?')[0]]))))

  app.get('/healthz', async () => ({ status: 'ok' }))

  app.get('/readyz', async (_request, reply) => {
    const problem = await source.ready()
    if (problem === undefined) return { status: 'ready' }
    return await reply.code(503).type('application/problem+json').send(toProblem(new GatewayError('NOT_READY', [problem])))
  })

  app.get('/metrics', async (_request, reply) => {
    const { contentType, text } = await source.metrics()
    reply.type(contentType)
    return text
  })
  return app
}
