// The log destination of the gateway process: pino's default writes each line with its own
// write(2), which in the bench profile cost more CPU than the rest of the logging (one
// access-log line per request). Lines are batched instead and written together once 16 KiB
// have gathered or 100 ms after the first, like nginx's `access_log … buffer= flush=`; the
// process flushes what is left on exit, so only a SIGKILL can lose (≤ 100 ms of) lines.
export interface LineSink { write (data: string): unknown }

export class BatchedLog {
  readonly #out: LineSink
  readonly #maxBytes: number
  readonly #maxDelayMs: number
  #lines: string[] = []
  #bytes = 0
  #timer: NodeJS.Timeout | undefined

  constructor (out: LineSink, options: { maxBytes?: number, maxDelayMs?: number } = {}) {
    this.#out = out
    this.#maxBytes = options.maxBytes ?? 16_384
    this.#maxDelayMs = options.maxDelayMs ?? 100
  }

  write (line: string): boolean {
    this.#lines.push(line)
    this.#bytes += line.length
    if (this.#bytes >= this.#maxBytes) this.flush()
    else this.#timer ??= setTimeout(() => { this.flush() }, this.#maxDelayMs).unref()
    return true
  }

  flush (): void {
    clearTimeout(this.#timer)
    this.#timer = undefined
    if (this.#lines.length === 0) return
    const data = this.#lines.length === 1 ? this.#lines[0] as string : this.#lines.join('')
    this.#lines = []
    this.#bytes = 0
    this.#out.write(data)
  }
}
