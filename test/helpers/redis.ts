import { spawn } from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import { connect } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Test } from 'tap'
import { closedPort } from './assert.js'

export interface TestRedis {
  readonly port: number
  readonly url: string
  stop(): Promise<void>
  start(): Promise<void>
  // SIGSTOP/SIGCONT: a Redis whose connections stay open but that answers nothing.
  pause(): void
  resume(): void
}

async function accepts (port: number): Promise<boolean> {
  return await new Promise(resolve => {
    const socket = connect(port, '127.0.0.1')
    socket.once('connect', () => { socket.destroy(); resolve(true) })
    socket.once('error', () => { resolve(false) })
  })
}

// A redis-server of the test's own on a free port (never the machine's 6379, which other
// test runs use), without persistence, so stopping and starting it empties it.
export async function startRedis (t: Test): Promise<TestRedis> {
  const port = await closedPort()
  let child: ChildProcess | undefined
  const redis: TestRedis = {
    port,
    url: `redis://127.0.0.1:${port}`,
    async start () {
      let failed: Error | undefined
      child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' })
      child.once('error', err => { failed = err })
      for (let i = 0; i < 200 && failed === undefined && !(await accepts(port)); i++) await sleep(25)
      if (failed !== undefined) throw new Error(`cannot start redis-server (${failed.message}); install it, e.g. apt-get install redis-server`)
    },
    pause () { child?.kill('SIGSTOP') },
    resume () { child?.kill('SIGCONT') },
    async stop () {
      const running = child
      child = undefined
      if (running === undefined || running.exitCode !== null) return
      await new Promise<void>(resolve => { running.once('exit', () => { resolve() }); running.kill('SIGKILL') })
      // SIGKILL ends a stopped process too
    }
  }
  await redis.start()
  t.teardown(async () => { await redis.stop() })
  return redis
}
