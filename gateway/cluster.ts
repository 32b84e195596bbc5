// GATEWAY_WORKERS > 1: a node:cluster primary that serves nothing itself. Its workers share
// the main HTTPS listener (the primary accepts and hands connections round-robin) and each
// open their own database and upstream pools; the primary answers the ops listener by
// asking them over IPC, so /metrics is one aggregated scrape rather than whichever worker a
// connection happened to land on.
import cluster from 'node:cluster'
import type { Worker } from 'node:cluster'
import { AggregatorRegistry, Gauge, Registry } from 'prom-client'
import type { Sql } from 'postgres'
import type { GatewayConfig } from '../shared/config.js'
import { startEmbeddedPostgres } from '../shared/db/embedded.js'
import type { EmbeddedPostgres } from '../shared/db/embedded.js'
import type { GatewayParts } from './app.js'
import { Counter } from './metrics.js'
import { buildOpsServer, readinessProblem, refreshMetrics } from './ops.js'

type MetricJson = Awaited<ReturnType<Registry['getMetricsAsJSON']>>[number]

const OPS_MESSAGE = 'ehr-gateway:ops'
const READY_MESSAGE = 'ehr-gateway:ready'
const IPC_TIMEOUT_MS = 2000
// Replacement back-off: immediate-ish for a one-off crash, doubling while workers keep
// dying within a minute of each other, so a crash loop costs a fork per 30 s at most.
const RESTART_BASE_MS = 100
const RESTART_MAX_MS = 30_000
const CRASH_WINDOW_MS = 60_000

interface OpsRequest { readonly type: typeof OPS_MESSAGE, readonly id: number, readonly query: 'readyz' | 'metrics' }
interface OpsResponse { readonly type: typeof OPS_MESSAGE, readonly id: number, readonly problem?: string, readonly metrics?: MetricJson[] }
interface ReadyMessage { readonly type: typeof READY_MESSAGE, readonly gateway: string }

const isMessage = <T extends { type: string }>(message: unknown, type: T['type']): message is T =>
  typeof message === 'object' && message !== null && (message as { type?: unknown }).type === type

// Worker side: answer the primary's ops questions about this worker's gateway.
export function answerOpsOverIpc (parts: GatewayParts, sql: Sql): () => void {
  const onMessage = (message: unknown): void => {
    if (!isMessage<OpsRequest>(message, OPS_MESSAGE)) return
    void (async () => {
      const response: OpsResponse = message.query === 'readyz'
        ? { type: OPS_MESSAGE, id: message.id, ...withProblem(await readinessProblem(parts, sql)) }
        : { type: OPS_MESSAGE, id: message.id, metrics: await refreshMetrics(parts).getMetricsAsJSON() }
      if (process.connected) process.send?.(response)
    })()
  }
  process.on('message', onMessage)
  return () => { process.off('message', onMessage) }
}

const withProblem = (problem: string | undefined): { problem?: string } => problem === undefined ? {} : { problem }

export function announceReady (gateway: string): void {
  const message: ReadyMessage = { type: READY_MESSAGE, gateway }
  process.send?.(message)
}

interface Logger {
  info(obj: object, msg: string): void
  warn(obj: object, msg: string): void
  error(obj: object, msg: string): void
}

export async function runPrimary (config: GatewayConfig): Promise<void> {
  const registry = new Registry()
  const restarts = new Counter({ name: 'ehr_gateway_worker_restarts_total', help: 'Workers replaced after they exited unexpectedly', registers: [registry] })
  const live = new Gauge({ name: 'ehr_gateway_workers', help: 'Worker processes serving the listeners', registers: [registry] })

  const ready = new Set<Worker>()
  const pending = new Map<number, { resolve: (r: OpsResponse | undefined) => void }>()
  let nextId = 0
  const ask = (worker: Worker, query: OpsRequest['query']): Promise<OpsResponse | undefined> => new Promise(resolve => {
    const id = ++nextId
    const timer = setTimeout(() => { pending.delete(id); resolve(undefined) }, IPC_TIMEOUT_MS)
    pending.set(id, { resolve: r => { clearTimeout(timer); pending.delete(id); resolve(r) } })
    const request: OpsRequest = { type: OPS_MESSAGE, id, query }
    try {
      worker.send(request)
    } catch {
      pending.get(id)?.resolve(undefined)
    }
  })

  const ops = buildOpsServer({
    ready: async () => {
      const workers = [...ready]
      if (workers.length === 0) return 'no worker is ready'
      const answers = await Promise.all(workers.map(async w => [w, await ask(w, 'readyz')] as const))
      for (const [w, answer] of answers) {
        if (answer === undefined) return `worker ${w.process.pid ?? '?'} did not answer`
        if (answer.problem !== undefined) return answer.problem
      }
      return undefined
    },
    metrics: async () => {
      const answers = await Promise.all([...ready].map(async w => await ask(w, 'metrics')))
      const perWorker = answers.flatMap(a => a?.metrics === undefined ? [] : [a.metrics])
      const aggregated = AggregatorRegistry.aggregate(perWorker)
      live.set(ready.size)
      return { contentType: aggregated.contentType, text: await aggregated.metrics() + await registry.metrics() }
    }
  }, { level: config.log.level })
  const log: Logger = ops.log

  let embedded: EmbeddedPostgres | undefined
  const workerEnv: Record<string, string> = {}
  let stopping = false
  const restartTimers = new Set<NodeJS.Timeout>()
  const crashes: number[] = []

  const fork = (): Worker => {
    const worker = cluster.fork(workerEnv)
    worker.on('error', (err: Error) => { log.warn({ err, worker: worker.process.pid }, 'worker IPC error') })
    worker.on('message', (message: unknown) => {
      if (isMessage<OpsResponse>(message, OPS_MESSAGE)) pending.get(message.id)?.resolve(message)
      else if (isMessage<ReadyMessage>(message, READY_MESSAGE)) {
        ready.add(worker)
        worker.emit('gateway-ready', message.gateway)
      }
    })
    return worker
  }

  const onExit = (worker: Worker, code: number | null, signal: string | null): void => {
    ready.delete(worker)
    if (stopping) return
    const now = Date.now()
    crashes.push(now)
    while (crashes.length > 0 && (crashes[0] as number) < now - CRASH_WINDOW_MS) crashes.shift()
    const delay = Math.min(RESTART_MAX_MS, RESTART_BASE_MS * 2 ** (crashes.length - 1))
    restarts.inc()
    log.error({ worker: worker.process.pid, code, signal, restartInMs: delay }, 'worker exited unexpectedly; starting a replacement')
    const timer = setTimeout(() => {
      restartTimers.delete(timer)
      if (stopping) return
      const replacement = fork()
      replacement.once('gateway-ready', () => { log.info({ worker: replacement.process.pid }, 'replacement worker ready') })
    }, delay)
    restartTimers.add(timer)
  }

  const stop = async (): Promise<boolean> => {
    stopping = true
    for (const timer of restartTimers) clearTimeout(timer)
    const workers = Object.values(cluster.workers ?? {}).filter((w): w is Worker => w !== undefined)
    // Each worker drains its own connections (SHUTDOWN_GRACE_MS) and closes in order; one
    // that outlives that by far is stopped hard.
    const codes = await Promise.all(workers.map(async w => await new Promise<number | null>(resolve => {
      if (w.isDead()) { resolve(w.process.exitCode ?? null); return }
      const kill = setTimeout(() => { w.process.kill('SIGKILL') }, config.gateway.shutdownGraceMs + 10_000)
      w.once('exit', (code: number | null) => { clearTimeout(kill); resolve(code) })
      w.process.kill('SIGTERM')
    })))
    let clean = codes.every(c => c === 0)
    try {
      await ops.close()
    } catch (err) {
      clean = false
      log.error({ err }, 'closing the ops listener failed')
    }
    await embedded?.stop()
    return clean
  }

  try {
    // The embedded development Postgres belongs to the primary: workers get its URL and
    // come and go without restarting the database under their siblings.
    if (config.database.url === undefined) {
      embedded = await startEmbeddedPostgres({ dir: '.data' })
      workerEnv['DATABASE_URL'] = embedded.url
    }
    const opsListening = await ops.listen({ host: config.ops.host, port: config.ops.port })
    const workers = Array.from({ length: config.gateway.workers }, fork)
    // A worker that fails to start (bad TLS files, unmigrated database…) has said why on
    // stderr; the others would fail alike, so the start fails instead of looping.
    const gateway = await new Promise<string>((resolve, reject) => {
      let readyCount = 0
      const failures = workers.map(w => (code: number | null): void => {
        reject(new Error(`worker ${w.process.pid ?? '?'} exited with code ${String(code)} during the start (its error is above)`))
      })
      workers.forEach((w, i) => {
        w.once('exit', failures[i] as (code: number | null) => void)
        w.once('gateway-ready', (listening: string) => {
          if (++readyCount < workers.length) return
          workers.forEach((other, j) => { other.off('exit', failures[j] as (code: number | null) => void) })
          resolve(listening)
        })
      })
    })
    cluster.on('exit', onExit)
    log.info({ gateway, ops: opsListening, workers: workers.map(w => w.process.pid) }, 'ehr-gateway ready')
  } catch (err) {
    await stop()
    throw err
  }

  process.on('SIGHUP', () => {
    log.info({ signal: 'SIGHUP', workers: [...ready].map(w => w.process.pid) }, 'reloading the TLS files in every worker')
    for (const w of Object.values(cluster.workers ?? {})) w?.process.kill('SIGHUP')
  })
  const shutdown = (signal: string): void => {
    if (stopping) return
    log.info({ signal }, 'shutting down: draining every worker')
    void stop().then(clean => {
      log.info({ clean }, 'all workers stopped')
      process.exitCode = clean ? 0 : 1
    })
  }
  process.once('SIGTERM', () => { shutdown('SIGTERM') })
  process.once('SIGINT', () => { shutdown('SIGINT') })
}
