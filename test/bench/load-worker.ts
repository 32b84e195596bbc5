// Closed-loop load generator in its own thread: `connections` keep-alive connections, each
// sending its next request as soon as the previous answer is read.
import { parentPort, workerData } from 'node:worker_threads'
import { Pool } from 'undici'

export interface LoadJob {
  readonly origin: string
  readonly path: string
  readonly headers: Record<string, string>
  readonly connections: number
  readonly seconds: number
  readonly tls?: { ca: string, cert: string, key: string }
}

export interface LoadResult { readonly requests: number, readonly errors: number, readonly seconds: number, readonly latenciesMs: number[] }

const job = workerData as LoadJob
const pool = new Pool(job.origin, {
  connections: job.connections,
  pipelining: 1,
  ...(job.tls === undefined ? {} : { connect: { ...job.tls, servername: 'localhost' } })
})
const latencies: number[] = []
let errors = 0
const started = performance.now()
const until = started + job.seconds * 1000

async function loop (): Promise<void> {
  while (performance.now() < until) {
    const t0 = performance.now()
    try {
      const res = await pool.request({ method: 'GET', path: job.path, headers: job.headers })
      await res.body.dump()
      if (res.statusCode !== 200) errors++
      else latencies.push(performance.now() - t0)
    } catch {
      errors++
    }
  }
}

await Promise.all(Array.from({ length: job.connections }, loop))
const seconds = (performance.now() - started) / 1000
await pool.close()
const result: LoadResult = { requests: latencies.length, errors, seconds, latenciesMs: latencies }
parentPort?.postMessage(result)
