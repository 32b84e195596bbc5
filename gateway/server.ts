// The gateway process: the only place that reads the environment, listens and handles
// signals (STYLE §1). Everything it opens it closes, in reverse order (STYLE §6), on a
// signal and on a failed start alike.
import cluster from 'node:cluster'
import { loadGatewayConfig } from '../shared/config.js'
import type { GatewayConfig } from '../shared/config.js'
import { openDatabase } from '../shared/db/client.js'
import { assertSchemaCurrent } from '../shared/db/migrations.js'
import { devKeyEncryptionKey } from '../shared/dev-secrets.js'
import { GatewayError } from '../shared/errors.js'
import { buildGateway } from './app.js'
import { announceReady, answerOpsOverIpc, runPrimary } from './cluster.js'
import type { FastifyInstance } from 'fastify'
import { BatchedLog } from './log-destination.js'
import { buildOps } from './ops.js'
import { createUpstreamPool } from './upstream.js'

type Closer = readonly [name: string, close: () => Promise<unknown>]

async function closeAll (closers: Closer[], log: (msg: string, err: unknown) => void): Promise<boolean> {
  let clean = true
  for (const [name, close] of closers.reverse()) {
    try {
      await close()
    } catch (err) {
      clean = false
      log(`closing ${name} failed`, err)
    }
  }
  return clean
}

async function main (): Promise<void> {
  // The gateway process is production unless told otherwise: the development fallbacks
  // (embedded Postgres, a key-encryption key kept in ./.data) need NODE_ENV=development.
  const config = loadGatewayConfig(process.env, { dotenvPath: '.env', defaults: { NODE_ENV: 'production' }, devKeyEncryptionKey: devKeyEncryptionKey() })
  // GATEWAY_WORKERS=1 is the plain process below, no cluster; more make this process a
  // primary that forks them (gateway/cluster.ts), and each of them runs serve().
  if (config.gateway.workers > 1 && cluster.isPrimary) await runPrimary(config)
  else await serve(config, cluster.isWorker)
}

async function serve (config: GatewayConfig, worker: boolean): Promise<void> {
  const closers: Closer[] = []
  let app: FastifyInstance | undefined
  const logError = (msg: string, err: unknown): void => {
    if (app !== undefined) app.log.error({ err }, msg)
    else process.stderr.write(`ehr-gateway: ${msg}: ${err instanceof Error ? err.message : String(err)}\n`)
  }
  try {
    const db = await openDatabase(config)
    closers.push(['database', async () => { await db.close() }])
    await assertSchemaCurrent(db.sql)
    const pool = createUpstreamPool(config)
    closers.push(['upstream pool', async () => { await pool.close() }])
    const logStream = new BatchedLog(process.stdout)
    process.once('exit', () => { logStream.flush() })
    app = await buildGateway(config, { sql: db.sql, upstream: pool, logStream })
    const gateway = app
    closers.push(['gateway', async () => { await gateway.close() }])
    if (worker) {
      // The primary owns the ops listener and asks each worker over IPC.
      const stopAnswering = answerOpsOverIpc(gateway.gateway, db.sql)
      closers.push(['ops IPC', async () => { stopAnswering() }])
      const listening = await gateway.listen({ host: config.gateway.host, port: config.gateway.port })
      gateway.log.info({ gateway: listening, worker: cluster.worker?.id }, 'worker ready')
      announceReady(listening)
    } else {
      const ops = buildOps(gateway.gateway, db.sql)
      closers.push(['ops listener', async () => { await ops.close() }])
      const listening = await gateway.listen({ host: config.gateway.host, port: config.gateway.port })
      const opsListening = await ops.listen({ host: config.ops.host, port: config.ops.port })
      gateway.log.info({ gateway: listening, ops: opsListening, upstream: config.upstream.url.origin }, 'ehr-gateway ready')
    }
  } catch (err) {
    await closeAll(closers, logError)
    throw err
  }

  const gateway = app
  let closing = false
  const shutdown = (signal: string): void => {
    if (closing) return
    closing = true
    gateway.log.info({ signal }, 'shutting down: draining in-flight requests')
    // In-flight requests get SHUTDOWN_GRACE_MS; then their connections are cut so the
    // pool and the database still close in order.
    const cut = setTimeout(() => {
      gateway.log.warn('in-flight requests outlived SHUTDOWN_GRACE_MS; closing their connections')
      gateway.server.closeAllConnections()
    }, config.gateway.shutdownGraceMs).unref()
    void closeAll(closers, logError).then(clean => {
      clearTimeout(cut)
      process.exitCode = clean ? 0 : 1
      // A worker's IPC channel would keep it alive; the primary reads the exit code.
      if (worker && process.connected) process.disconnect()
    })
  }
  process.once('SIGTERM', () => { shutdown('SIGTERM') })
  process.once('SIGINT', () => { shutdown('SIGINT') })
  // A worker whose primary is gone (killed hard) has nobody to hand it connections.
  if (worker) process.once('disconnect', () => { shutdown('primary exited') })
  // SIGHUP re-reads the TLS files (the watcher does so by itself on most file systems);
  // the handler also keeps SIGHUP's default action, exit, from ever applying.
  process.on('SIGHUP', () => { gateway.gateway.tls?.reload('SIGHUP') })
}

main().catch((err: unknown) => {
  // One line an operator can act on; the config error already lists every variable.
  const message = err instanceof GatewayError ? `${err.code}: ${err.message}` : (err instanceof Error ? err.message : String(err))
  process.stderr.write(`ehr-gateway: ${message}\n`)
  // Everything opened was closed above; exit even if a library left a handle behind.
  process.exit(1)
})
