// Child processes for the bench and what /proc says about them: every server under test is
// its own process (tree), so its CPU time and RSS are its own.
import { spawn } from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import { readFileSync, readdirSync } from 'node:fs'
import { createInterface } from 'node:readline'

export interface Proc {
  readonly child: ChildProcess
  readonly pid: number
  // stderr so far (a failed start is reported with it)
  readonly stderr: () => string
  readonly stop: () => Promise<void>
}

// stdout 'ignore': the process writes to /dev/null (the gateway's access log: formatted and
// written as in production, never read).
export function start (command: string, args: readonly string[], env: Record<string, string | undefined>, options: { cwd?: string, stdout?: 'pipe' | 'ignore' } = {}): Proc {
  const child = spawn(command, args, { env: env as NodeJS.ProcessEnv, stdio: ['ignore', options.stdout ?? 'pipe', 'pipe'], cwd: options.cwd })
  let stderr = ''
  child.stderr?.on('data', (chunk: Buffer) => { if (stderr.length < 20_000) stderr += chunk.toString() })
  const exited = new Promise<void>(resolve => { child.once('exit', () => { resolve() }) })
  return {
    child,
    pid: child.pid ?? -1,
    stderr: () => stderr,
    stop: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return
      child.kill('SIGTERM')
      const timer = setTimeout(() => { child.kill('SIGKILL') }, 10_000)
      await exited
      clearTimeout(timer)
    }
  }
}

// The first stdout line parsed as JSON (how upstream.ts and plain-proxy.ts say they listen).
export async function firstJsonLine<T> (proc: Proc, timeoutMs = 20_000): Promise<T> {
  const lines = createInterface({ input: proc.child.stdout as NodeJS.ReadableStream })
  return await new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => { reject(new Error(`no start line within ${timeoutMs} ms: ${proc.stderr()}`)) }, timeoutMs)
    proc.child.once('exit', code => { clearTimeout(timer); reject(new Error(`exited with ${String(code)}: ${proc.stderr()}`)) })
    lines.once('line', line => { clearTimeout(timer); resolve(JSON.parse(line) as T) })
  })
}

const TICKS = 100 // USER_HZ on Linux

function stat (pid: number): string[] | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8')
    // The command name may hold spaces and parentheses; fields follow the last ')'.
    return text.slice(text.lastIndexOf(')') + 2).split(' ')
  } catch {
    return undefined
  }
}

// The pid and all its descendants (nginx and cluster workers are children).
export function tree (root: number): number[] {
  const children = new Map<number, number[]>()
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    const fields = stat(Number(entry))
    if (fields === undefined) continue
    const ppid = Number(fields[1])
    children.set(ppid, [...(children.get(ppid) ?? []), Number(entry)])
  }
  const out: number[] = []
  const queue = [root]
  while (queue.length > 0) {
    const pid = queue.shift() as number
    out.push(pid)
    queue.push(...(children.get(pid) ?? []))
  }
  return out
}

// CPU seconds (user + system) used so far by the process tree.
export function cpuSeconds (root: number): number {
  let ticks = 0
  for (const pid of tree(root)) {
    const fields = stat(pid)
    // fields[11] utime, fields[12] stime (stat(5) fields 14 and 15)
    if (fields !== undefined) ticks += Number(fields[11]) + Number(fields[12])
  }
  return ticks / TICKS
}

// Resident set size of the tree, bytes.
export function rssBytes (root: number): number {
  let bytes = 0
  for (const pid of tree(root)) {
    try {
      const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
      if (m !== null) bytes += Number(m[1]) * 1024
    } catch {}
  }
  return bytes
}

export async function freePort (): Promise<number> {
  const { createServer } = await import('node:net')
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number }
      server.close(() => { resolve(port) })
    })
  })
}

// CPU seconds used so far by every local Postgres process (postmaster, backends, WAL
// writer): what audit rows and replay checks cost the database, which shares the cores
// with everything else here. Only local processes count: 0 for a database on another host.
export function postgresCpuSeconds (): number {
  let ticks = 0
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const text = readFileSync(`/proc/${entry}/stat`, 'utf8')
      if (!text.includes('(postgres)')) continue
      const fields = text.slice(text.lastIndexOf(')') + 2).split(' ')
      ticks += Number(fields[11]) + Number(fields[12])
    } catch {}
  }
  return ticks / TICKS
}

// The machine's CPU ticks so far, and how many of them the hypervisor gave to other guests
// (steal): a round with much steal was measured on a slower machine than the others.
export function machineTicks (): { total: number, steal: number } {
  const cpu = readFileSync('/proc/stat', 'utf8').split('\n')[0]?.trim().split(/\s+/).slice(1).map(Number) ?? []
  // user nice system idle iowait irq softirq steal (guest time is inside user already)
  const total = cpu.slice(0, 8).reduce((a, b) => a + b, 0)
  return { total, steal: cpu[7] ?? 0 }
}
