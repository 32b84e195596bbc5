import { realpathSync, watch } from 'node:fs'
import type { FSWatcher } from 'node:fs'
import type { X509Certificate } from 'node:crypto'
import { dirname } from 'node:path'
import type { Server as TlsServer, TLSSocket } from 'node:tls'
import type { FastifyBaseLogger } from 'fastify'
import { distrustPeer } from './identity.js'
import { chainAnchoredIn, checkTlsMaterial, readTlsFiles, reloadOptions, sameTlsBytes } from './tls.js'
import type { TlsFiles, TlsMaterial } from './tls.js'

export type ReloadResult = 'reloaded' | 'unchanged' | 'failed'

export interface TlsReloaderOptions {
  readonly files: TlsFiles
  readonly initial: TlsMaterial
  readonly log: FastifyBaseLogger
  readonly onResult?: (result: ReloadResult, material: TlsMaterial) => void
  // Quiet time after the last file event before re-reading: a rotation touches up to three
  // files (and Kubernetes several directory entries) in quick succession.
  readonly debounceMs?: number
}

// A handshake under way when the client CA changes may still complete against the old
// context; Node's default handshake timeout (tls.Server handshakeTimeout) bounds how long.
const HANDSHAKE_TIMEOUT_MS = 120_000

// Hot reload of the server certificate, its key and the client CA bundle. The directories
// holding the files are watched, not the files: Kubernetes (and most secret managers)
// replace a mounted secret by swapping a `..data` symlink to a new timestamped directory,
// which leaves a watch on the old file's inode watching nothing. Every trigger re-reads all
// three files and changes nothing unless they parse, belong together and differ from what is
// served. tls.Server#setSecureContext then applies to new handshakes only: open keep-alive
// connections keep the context they were made with.
export class TlsReloader {
  readonly #files: TlsFiles
  readonly #log: FastifyBaseLogger
  readonly #onResult: (result: ReloadResult, material: TlsMaterial) => void
  readonly #debounceMs: number
  #current: TlsMaterial
  #server: TlsServer | undefined
  readonly #watchers = new Map<string, FSWatcher>()
  readonly #sockets = new Set<TLSSocket>()
  #timer: NodeJS.Timeout | undefined
  #caChangedAt = -Infinity
  #closed = false

  constructor (options: TlsReloaderOptions) {
    this.#files = options.files
    this.#current = options.initial
    this.#log = options.log
    this.#onResult = options.onResult ?? (() => {})
    this.#debounceMs = options.debounceMs ?? 250
  }

  get material (): TlsMaterial { return this.#current }

  // The client CAs now trusted, for certificate checks made in code rather than by OpenSSL.
  get clientCas (): readonly X509Certificate[] { return this.#current.clientCas }

  attach (server: TlsServer): void {
    this.#server = server
    // Authenticated connections are remembered while open, so that a client CA removed by a
    // reload stops vouching for the connections it admitted.
    server.on('secureConnection', (socket: TLSSocket) => {
      if (!socket.authorized) return
      if (performance.now() - this.#caChangedAt < HANDSHAKE_TIMEOUT_MS) this.#recheck(socket)
      this.#sockets.add(socket)
      socket.once('close', () => { this.#sockets.delete(socket) })
    })
  }

  watch (): void {
    this.#rewatch()
  }

  close (): void {
    this.#closed = true
    clearTimeout(this.#timer)
    for (const watcher of this.#watchers.values()) watcher.close()
    this.#watchers.clear()
    this.#sockets.clear()
  }

  reload (trigger: string): ReloadResult {
    const previous = this.#current
    let next: TlsMaterial
    try {
      const bytes = readTlsFiles(this.#files)
      // Most file events (and a SIGHUP sent to be sure) change nothing: compare before parsing.
      if (sameTlsBytes(bytes, previous)) {
        this.#log.debug({ trigger }, 'TLS files unchanged')
        this.#onResult('unchanged', previous)
        return 'unchanged'
      }
      next = checkTlsMaterial(this.#files, bytes)
    } catch (err) {
      this.#log.error({ err, trigger }, 'TLS reload refused; still serving the previous certificate and client CA')
      this.#onResult('failed', previous)
      return 'failed'
    } finally {
      // A symlink swap moves where the files really are; follow them.
      this.#rewatch()
    }
    try {
      this.#server?.setSecureContext(reloadOptions(next))
    } catch (err) {
      /* c8 ignore next 3 */
      this.#log.error({ err, trigger }, 'TLS reload refused by OpenSSL; still serving the previous certificate and client CA')
      this.#onResult('failed', previous)
      return 'failed'
    }
    this.#current = next
    let distrusted = 0
    if (!next.ca.equals(previous.ca)) {
      this.#caChangedAt = performance.now()
      for (const socket of this.#sockets) if (!this.#recheck(socket)) distrusted++
    }
    this.#log.info({
      trigger,
      certificate: { subject: next.serverCert.subject, fingerprint256: next.serverCert.fingerprint256, validTo: next.serverCert.validTo },
      clientCas: next.clientCas.map(ca => ca.subject),
      distrustedConnections: distrusted
    }, 'TLS certificate and client CA reloaded')
    this.#onResult('reloaded', next)
    return 'reloaded'
  }

  // false: the connection's chain leads to no CA of the current bundle; refuse its requests.
  #recheck (socket: TLSSocket): boolean {
    if (socket.destroyed) return true
    let anchored = false
    try {
      anchored = chainAnchoredIn(socket, this.#current.clientCas)
    } catch {}
    if (!anchored) {
      distrustPeer(socket, 'its CA was removed from TLS_CLIENT_CA_FILE')
      this.#sockets.delete(socket)
    }
    return anchored
  }

  #schedule (): void {
    if (this.#closed) return
    clearTimeout(this.#timer)
    this.#timer = setTimeout(() => { this.reload('file change') }, this.#debounceMs).unref()
  }

  // The directory of each configured path, and of the file it resolves to now (a file that
  // is itself a symlink elsewhere is rewritten there).
  #rewatch (): void {
    if (this.#closed) return
    const dirs = new Set<string>()
    // Resolved, so that a directory symlink switched elsewhere is watched where it now points.
    const resolve = (path: string): void => {
      try {
        dirs.add(realpathSync(path))
      } catch {}
    }
    for (const file of [this.#files.certFile, this.#files.keyFile, this.#files.clientCaFile]) {
      resolve(dirname(file))
      try {
        resolve(dirname(realpathSync(file)))
      } catch {}
    }
    for (const [dir, watcher] of this.#watchers) {
      if (!dirs.has(dir)) {
        watcher.close()
        this.#watchers.delete(dir)
      }
    }
    for (const dir of dirs) {
      if (this.#watchers.has(dir)) continue
      try {
        const watcher = watch(dir, { persistent: false }, () => { this.#schedule() })
        watcher.on('error', () => {
          // The directory went away (an old Kubernetes timestamped directory): forget it,
          // and look again where the files are now.
          watcher.close()
          if (this.#watchers.get(dir) === watcher) this.#watchers.delete(dir)
          this.#schedule()
        })
        this.#watchers.set(dir, watcher)
      } catch (err) {
        this.#log.warn({ err, dir }, 'cannot watch a TLS file directory; reload on SIGHUP instead')
      }
    }
  }
}
