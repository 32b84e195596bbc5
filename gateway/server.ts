// The gateway process: the only place that reads the environment, listens and handles
// signals (STYLE §1). Everything it opens it closes, in reverse order (STYLE §6).
import { loadGatewayConfig } from '../shared/config.js'
import { openDatabase } from '../shared/db/client.js'
import { assertSchemaCurrent } from '../shared/db/migrations.js'
import { devKeyEncryptionKey } from '../shared/dev-secrets.js'
import { GatewayError } from '../shared/errors.js'
import { buildGateway } from './app.js'
import { buildOps } from './ops.js'
import { createUpstreamPool } from './upstream.js'

async function main (): Promise<void> {
  const config = loadGatewayConfig(process.env, { dotenvPath: '.env', devKeyEncryptionKey: devKeyEncryptionKey() })
  const db = await openDatabase(config)
  try {
    await assertSchemaCurrent(db.sql)
  } catch (err) {
    await db.close()
    throw err
  }
  const pool = createUpstreamPool(config)
  const app = await buildGateway(config, { sql: db.sql, upstream: pool })
  const ops = buildOps(app.gateway, db.sql)
  const listening = await app.listen({ host: config.gateway.host, port: config.gateway.port })
  const opsListening = await ops.listen({ host: config.ops.host, port: config.ops.port })
  app.log.info({ gateway: listening, ops: opsListening, upstream: config.upstream.url.origin }, 'ehr-gateway ready')

  let closing = false
  const shutdown = (signal: string): void => {
    if (closing) return
    closing = true
    app.log.info({ signal }, 'shutting down: draining in-flight requests')
    const force = setTimeout(() => {
      app.log.error('in-flight requests outlived SHUTDOWN_GRACE_MS; exiting')
      process.exit(1)
    }, config.gateway.shutdownGraceMs + 5000).unref()
    void (async () => {
      await ops.close()
      // Fastify stops accepting, answers 503 to new requests on kept-alive sockets and
      // waits for in-flight ones.
      await app.close()
      await pool.close()
      await db.close()
      clearTimeout(force)
    })().catch(err => {
      app.log.error({ err }, 'shutdown failed')
      process.exitCode = 1
    })
  }
  process.once('SIGTERM', () => { shutdown('SIGTERM') })
  process.once('SIGINT', () => { shutdown('SIGINT') })
}

main().catch((err: unknown) => {
  // One line an operator can act on; the config error already lists every variable.
  const message = err instanceof GatewayError ? `${err.code}: ${err.message}` : (err instanceof Error ? err.message : String(err))
  process.stderr.write(`ehr-gateway: ${message}\n`)
  process.exitCode = 1
})
