import { isIP } from 'node:net'
import type { FastifyBaseLogger, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { MAX_AUDIT_BATCH } from '../shared/db/audit.js'
import type { AuditRecord } from '../shared/db/audit.js'
import { GatewayError } from '../shared/errors.js'
import type { ErrorCode } from '../shared/errors.js'
import { presentedThumbprint } from './identity.js'
import type { Metrics } from './metrics.js'

declare module 'fastify' {
  interface FastifyRequest {
    // Filled in along the audited routes; read once, when the row is built.
    upstreamMs: number | null
    bytesIn: number
    auditBytesWritten: number
    auditStarted: number
    audited: boolean
  }
}

// What the request path needs of the audit trail. AuditTrail is the one implementation
// the gateway uses; the interface exists so a benchmark can build the app without one.
export interface AuditSink {
  // False when the buffer is full: the request must be refused, not served unaudited.
  admit(): boolean
  record(row: AuditRecord): void
  // The same condition without counting a refusal: /readyz takes the instance out of the
  // load balancer while it lasts.
  readonly full: boolean
}

export interface AuditTrailOptions {
  readonly bufferMax: number
  readonly batchSize: number
  readonly flushIntervalMs: number
  readonly closeTimeoutMs: number
  readonly log: Pick<FastifyBaseLogger, 'info' | 'warn' | 'error'>
  readonly metrics: Metrics
}

const RETRY_MIN_MS = 100
const RETRY_MAX_MS = 5000

const sleep = async (ms: number): Promise<void> => { await new Promise(resolve => setTimeout(resolve, ms)) }

// Audit rows, buffered in memory and written in batches off the request path (a timer and
// a size trigger; one multi-row insert per batch, one batch in flight). A failed write
// keeps its rows at the head of the buffer and is retried with back-off until Postgres
// takes them; a batch is one statement, so a failure wrote nothing, and a retry after a
// lost acknowledgement is deduplicated by request id. Rows are never dropped: when the
// buffer holds `bufferMax`, admit() refuses new requests (they get AUDIT_UNAVAILABLE, are
// counted and logged, not recorded — recording them would grow the buffer without bound
// under a flood); requests already admitted are still recorded, so the buffer exceeds
// bufferMax by at most the requests in flight.
export class AuditTrail implements AuditSink {
  readonly #write: (rows: readonly AuditRecord[]) => Promise<unknown>
  readonly #options: AuditTrailOptions
  readonly #batchSize: number
  #buffer: AuditRecord[] = []
  #writing: Promise<void> | undefined
  #timer: NodeJS.Timeout | undefined
  #failures = 0
  #retryAt = 0
  #full = false
  #closed = false
  // Rows to write one at a time, to find a row Postgres refuses in a batch it refused.
  #isolating = 0

  constructor (write: (rows: readonly AuditRecord[]) => Promise<unknown>, options: AuditTrailOptions) {
    this.#write = write
    this.#options = options
    this.#batchSize = Math.min(options.batchSize, MAX_AUDIT_BATCH)
  }

  get depth (): number { return this.#buffer.length }
  get full (): boolean { return this.#buffer.length >= this.#options.bufferMax }

  start (): void {
    this.#timer ??= setInterval(() => { this.#kick() }, this.#options.flushIntervalMs).unref()
  }

  admit (): boolean {
    if (this.#buffer.length < this.#options.bufferMax) return true
    if (!this.#full) {
      this.#full = true
      this.#options.log.error({ depth: this.#buffer.length, bufferMax: this.#options.bufferMax },
        'audit buffer full: refusing EHR traffic and token issuance (AUDIT_UNAVAILABLE) until the database takes the rows')
    }
    this.#options.metrics.auditRefusals.inc()
    return false
  }

  record (row: AuditRecord): void {
    if (this.#closed) {
      // After close nothing will write it: the log is the record of last resort.
      this.#unwritten([row])
      return
    }
    this.#buffer.push(row)
    if (this.#buffer.length >= this.#batchSize) this.#kick()
  }

  #kick (): void {
    if (this.#writing !== undefined || this.#buffer.length === 0 || performance.now() < this.#retryAt) return
    this.#writing = this.#writeBatch().finally(() => {
      this.#writing = undefined
      if (this.#buffer.length >= this.#batchSize && !this.#closed) this.#kick()
    })
  }

  async #writeBatch (): Promise<void> {
    const batch = this.#buffer.slice(0, this.#isolating > 0 ? 1 : this.#batchSize)
    const { metrics, log } = this.#options
    const started = performance.now()
    try {
      await this.#write(batch)
    } catch (err) {
      metrics.auditWriteDuration.labels('failed').observe((performance.now() - started) / 1000)
      metrics.auditWriteFailures.inc()
      // A value Postgres refuses (SQLSTATE class 22, data exception) would fail its batch
      // forever and, the buffer full, stop all traffic: find it, and move that one row to the
      // error log. Anything else (connection, lock, permission) is retried as it is.
      if (/^22/.test(String((err as { code?: unknown }).code))) {
        if (batch.length === 1) {
          this.#buffer.splice(0, 1)
          this.#isolating = Math.max(this.#isolating - 1, 0)
          log.error({ err }, 'Postgres refused an audit row; it follows in this log as "unwritten audit row"')
          this.#unwritten(batch)
        } else {
          this.#isolating = batch.length
        }
        return
      }
      this.#failures++
      this.#retryAt = performance.now() + Math.min(RETRY_MIN_MS * 2 ** (this.#failures - 1), RETRY_MAX_MS)
      if (this.#failures === 1) {
        log.error({ err, depth: this.#buffer.length }, 'audit write failed; rows stay buffered and are retried until the database takes them')
      }
      return
    }
    metrics.auditWriteDuration.labels('written').observe((performance.now() - started) / 1000)
    metrics.auditRowsWritten.inc(batch.length)
    // Only now, and only these: rows recorded meanwhile were appended behind them.
    this.#buffer.splice(0, batch.length)
    if (this.#isolating > 0) this.#isolating--
    if (this.#failures > 0) {
      log.warn({ failedAttempts: this.#failures, depth: this.#buffer.length }, 'audit writes resumed')
      this.#failures = 0
      this.#retryAt = 0
    }
    if (this.#full && this.#buffer.length < this.#options.bufferMax) {
      this.#full = false
      log.warn({ depth: this.#buffer.length }, 'audit buffer has room again: serving EHR traffic')
    }
  }

  // Shutdown: after the listener has drained, write what is buffered, trying (with the same
  // back-off) until closeTimeoutMs, a write in flight included; whatever is left goes to the
  // error log row by row. A write still in flight then may yet commit: replaying the log
  // later is safe, the request id deduplicates.
  async close (): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    clearInterval(this.#timer)
    const deadline = performance.now() + this.#options.closeTimeoutMs
    const remaining = (): number => deadline - performance.now()
    for (;;) {
      if (this.#writing !== undefined) {
        const writing = this.#writing
        let timer: NodeJS.Timeout | undefined
        const settled = await Promise.race([
          writing.then(() => true),
          new Promise<false>(resolve => { timer = setTimeout(() => { resolve(false) }, Math.max(remaining(), 0)) })
        ])
        clearTimeout(timer)
        if (!settled) break
      }
      if (this.#buffer.length === 0) break
      const wait = Math.max(this.#retryAt - performance.now(), 0)
      if (wait >= remaining()) break
      if (wait > 0) await sleep(wait)
      this.#writing = this.#writeBatch().finally(() => { this.#writing = undefined })
    }
    if (this.#buffer.length > 0) {
      this.#options.log.error({ rows: this.#buffer.length }, 'audit rows could not be written before shutdown; each follows in this log as "unwritten audit row"')
      this.#unwritten(this.#buffer)
      this.#buffer = []
    }
  }

  #unwritten (rows: readonly AuditRecord[]): void {
    this.#options.metrics.auditRowsUnwritten.inc(rows.length)
    for (const row of rows) this.#options.log.error({ audit: row }, 'unwritten audit row')
  }
}

const MAX_PATH = 2048
// Bytes the HTTP parser lets through but Postgres text or jsonb would refuse (NUL) or a log
// viewer would act on.
const CONTROL = /[\u0000-\u001f\u007f]/g
const MAX_QUERY_NAMES = 64
const MAX_NAME = 128
// FHIR R4 §2.1.0.1 (resource types are capitalised names) and id datatype.
const RESOURCE_TYPE = /^[A-Z][A-Za-z]{1,63}$/
const RESOURCE_ID = /^[A-Za-z0-9.-]{1,64}$/

// `/Patient/123/_history/2` → Patient, 123; `/Patient` → Patient; `/metadata`, `/$export`,
// `/Patient/$match` → what of type and id the path names. `rest` is the path after the
// proxy prefix, still percent-encoded.
export function fhirResource (rest: string): { type: string | null, id: string | null } {
  const [, first, second] = rest.split('/')
  const type = first !== undefined && RESOURCE_TYPE.test(first) ? first : null
  const id = type !== null && second !== undefined && RESOURCE_ID.test(second) ? second : null
  return { type, id }
}

// Parameter names as sent (still percent-encoded, so one name is one token), deduplicated
// and bounded; never a value.
export function queryParamNames (query: string): string[] {
  const names: string[] = []
  for (const pair of query.split('&')) {
    const eq = pair.indexOf('=')
    const name = (eq === -1 ? pair : pair.slice(0, eq)).slice(0, MAX_NAME)
    if (name !== '' && !names.includes(name)) names.push(name)
    if (names.length === MAX_QUERY_NAMES) break
  }
  return names
}

interface AuditHookOptions {
  readonly proxyPrefix: string
  readonly clock: () => number
  // The access line and request metrics of a request that ended without onResponse (the
  // client left first, or the answer was cut off mid-body); onResponse logs all the others.
  readonly logEndedEarly: (request: FastifyRequest, status: number, elapsedMs: number) => void
}

// Callback-style: an async hook costs a promise per request on the hot path.
type Done = (err?: Error) => void
export interface AuditHooks {
  readonly onRequest: (request: FastifyRequest, reply: FastifyReply, done: Done) => void
  readonly onResponse: (request: FastifyRequest, reply: FastifyReply, done: Done) => void
  readonly onRequestAbort: (request: FastifyRequest, done: Done) => void
}

// Route-level hooks for every route that is audited (the EHR proxy and the token
// endpoint). Declared on the route, they run before @fastify/rate-limit's onRequest hook
// (it appends its own), so a full buffer refuses before anything else is decided.
export function registerAudit (app: FastifyInstance, sink: AuditSink, options: AuditHookOptions): AuditHooks {
  app.decorateRequest('upstreamMs', null)
  app.decorateRequest('bytesIn', 0)
  app.decorateRequest('auditBytesWritten', 0)
  app.decorateRequest('auditStarted', 0)
  app.decorateRequest('audited', false)
  const { proxyPrefix, clock, logEndedEarly } = options

  function row (request: FastifyRequest, status: number, code: string | null, durationMs: number, bytesOut: number): AuditRecord {
    const url = request.raw.url ?? '/'
    const q = url.indexOf('?')
    const path = (q === -1 ? url : url.slice(0, q)).slice(0, MAX_PATH).replace(CONTROL, '?')
    const { type, id } = path.startsWith(proxyPrefix + '/') ? fhirResource(path.slice(proxyPrefix.length)) : { type: null, id: null }
    const machine = request.machine
    const declared = Number(request.headers['content-length'])
    return {
      at: new Date(clock() - durationMs),
      requestId: request.id,
      machineId: machine?.id ?? null,
      machineName: machine?.name ?? null,
      certThumbprint: request.certThumbprint ?? presentedThumbprint(request),
      tokenJti: request.tokenId,
      // A socket already gone (the client left) has no address any more.
      clientIp: isIP(request.ip) === 0 ? null : request.ip,
      method: request.method,
      route: request.routeOptions.url ?? path,
      path,
      resourceType: type,
      resourceId: id,
      queryParams: q === -1 ? [] : queryParamNames(url.slice(q + 1).replace(CONTROL, '?')),
      status,
      errorCode: code,
      durationMs,
      upstreamMs: request.upstreamMs,
      // Counted as streamed by the proxy; else what the client declared.
      bytesIn: request.bytesIn > 0 ? request.bytesIn : (Number.isFinite(declared) && declared > 0 ? declared : 0),
      bytesOut
    }
  }

  // Bytes this response put on the connection: status line, headers and body.
  const bytesOut = (request: FastifyRequest): number => request.raw.socket.bytesWritten - request.auditBytesWritten

  // A request that ends without onResponse: its row and access line, once.
  function endedEarly (request: FastifyRequest, status: number, code: ErrorCode): void {
    if (request.audited) return
    request.audited = true
    request.errorCode = code
    const elapsedMs = performance.now() - request.auditStarted
    sink.record(row(request, status, code, elapsedMs, bytesOut(request)))
    logEndedEarly(request, status, elapsedMs)
  }

  return {
    onRequest (request, reply, done) {
      request.auditBytesWritten = request.raw.socket.bytesWritten
      request.auditStarted = performance.now()
      if (!sink.admit()) {
        request.audited = true
        done(new GatewayError('AUDIT_UNAVAILABLE', [], { headers: { 'retry-after': '5' } }))
        return
      }
      // A response destroyed mid-body after the request body was read (client gone, upstream
      // body failed) fires neither onResponse nor onRequestAbort, only 'close'; the EHR may
      // have served or changed data all the same.
      reply.raw.once('close', () => {
        if (reply.raw.writableFinished) return
        endedEarly(request, reply.raw.headersSent ? reply.statusCode : 499, request.errorCode ?? 'CLIENT_CLOSED_REQUEST')
      })
      done()
    },
    onResponse (request, reply, done) {
      if (!request.audited) {
        request.audited = true
        sink.record(row(request, reply.statusCode, request.errorCode, reply.elapsedTime, bytesOut(request)))
      }
      done()
    },
    // The client went away before the answer: no onResponse will come.
    onRequestAbort (request, done) {
      endedEarly(request, 499, 'CLIENT_CLOSED_REQUEST')
      done()
    }
  }
}
