// Micro-benchmarks of the hot path's parts, in process. The parts other features bring
// (DPoP proof check, replay store, audit queue) are found by importing their built module and
// checking for the export the bench knows how to drive; a build without them says so.
import { randomUUID } from 'node:crypto'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import type { Sql } from 'postgres'
import { keyEncryptionKeyBytes, loadConfig } from '../../shared/config.js'
import type { Machine } from '../../shared/db/machines.js'
import { machinesRepository } from '../../shared/db/machines.js'

const budgetMs = Number(process.env['BENCH_MICRO_MS'] ?? 1000)

// Runs fn for about budgetMs (after a short warm-up) and prints its cost.
async function time (name: string, fn: (i: number) => unknown): Promise<void> {
  const warm = performance.now() + Math.min(200, budgetMs / 5)
  let i = 0
  while (performance.now() < warm) await fn(i++)
  let n = 0
  const t0 = performance.now()
  const until = t0 + budgetMs
  while (performance.now() < until) {
    for (let k = 0; k < 100; k++) await fn(i + n++)
  }
  const us = (performance.now() - t0) * 1000 / n
  console.log(`| ${name} | ${us < 10 ? us.toFixed(2) : us.toFixed(1)} | ${Math.round(1e6 / us).toLocaleString('en')} |`)
}

type Module = Record<string, unknown>
async function built (dist: string, path: string): Promise<Module | undefined> {
  const file = join(dist, path)
  return existsSync(file) ? await import(pathToFileURL(file).href) as Module : undefined
}

export async function runMicro (sql: Sql, dist: string, kek: string): Promise<void> {
  console.log(`micro-benchmarks (${budgetMs} ms each, in process):\n`)
  console.log('| part | µs / op | ops/s |')
  console.log('| --- | ---: | ---: |')
  const skipped: string[] = []
  const config = loadConfig({ NODE_ENV: 'test', TOKEN_KEY_ENCRYPTION_KEY: kek, TOKEN_ISSUER: 'https://localhost', TOKEN_TTL_SECONDS: '3600' })
  const machine = (await machinesRepository(sql).list())[0] as Machine

  // Token verification: the first sight of a token (signature) and every later one (cache).
  const tokensModule = await built(dist, 'gateway/tokens.js')
  const keysModule = await built(dist, 'gateway/signing-keys.js')
  const SigningKeys = keysModule?.['SigningKeys'] as (new (sql: Sql, o: unknown) => { start: () => Promise<void>, close: () => Promise<void> }) | undefined
  const TokenService = tokensModule?.['TokenService'] as (new (k: unknown, c: unknown, n: () => number) => { issue: (...a: unknown[]) => Promise<{ token: string }>, verify: (t: string) => Promise<unknown> }) | undefined
  if (SigningKeys !== undefined && TokenService !== undefined) {
    const keys = new SigningKeys(sql, { kek: keyEncryptionKeyBytes(config.tokens.keyEncryptionKey as never), tokens: config.tokens, now: Date.now, onReloadError: () => {} })
    await keys.start()
    try {
      const tokens = new TokenService(keys, config.tokens, Date.now)
      const fresh: string[] = []
      for (let i = 0; i < 3000; i++) fresh.push((await tokens.issue(machine, machine.fingerprint, '127.0.0.1')).token)
      await time('token issue (sign)', async () => await tokens.issue(machine, machine.fingerprint, '127.0.0.1'))
      let next = 0
      await time('token verify, cold (signature check)', async () => {
        if (next >= fresh.length) fresh.push((await tokens.issue(machine, machine.fingerprint, '127.0.0.1')).token)
        await tokens.verify(fresh[next++] as string)
      })
      const hot = fresh[0] as string
      await time('token verify, cached claims', async () => await tokens.verify(hot))
    } catch (err) {
      skipped.push(`token service: its API changed (${err instanceof Error ? err.message : String(err)}); update test/bench/micro.ts`)
    } finally {
      await keys.close()
    }
  } else {
    skipped.push('token service: not found in this build')
  }

  const { MachineRegistry } = await import('../../gateway/registry.js')
  const registry = new MachineRegistry(sql, { ttlMs: 60_000, now: Date.now })
  await registry.lookup(machine.fingerprint)
  await time('registry lookup (cache hit)', async () => await registry.lookup(machine.fingerprint))

  const upstream = await import('../../gateway/upstream.js')
  const incoming = {
    host: 'gateway.example:8443', 'user-agent': 'Mozilla/5.0 (X11; Linux x86_64) Frontend/1.0', accept: 'application/fhir+json',
    'accept-encoding': 'gzip, deflate, br', 'accept-language': 'en', authorization: `Bearer ${'x'.repeat(600)}`, connection: 'keep-alive', 'x-forwarded-for': '10.0.0.1'
  }
  await time('upstream request headers', () => upstream.upstreamRequestHeaders(incoming, 'x-api-key', 'k'.repeat(32), randomUUID()))
  const answered = { 'content-type': 'application/fhir+json', 'content-length': '1517', etag: 'W/"1"', 'last-modified': 'Thu, 01 Jan 2026 00:00:00 GMT', server: 'HAPI', date: 'Thu, 01 Jan 2026 00:00:00 GMT', connection: 'keep-alive', 'keep-alive': 'timeout=5' }
  const rewrite = { upstreamBase: 'http://ehr.internal/fhir', upstreamBasePath: '/fhir', proxyPrefix: '/fhir' }
  await time('client response headers', () => upstream.clientResponseHeaders(answered, rewrite, () => false))
  await time('upstream path check', () => upstream.upstreamPath('/fhir/Patient/bench-0001?_format=json', '/fhir', '/fhir'))

  // Brought by the DPoP work (issue 3): proof verification and the replay store.
  const dpop = await built(dist, 'gateway/dpop.js')
  const verifyProof = dpop?.['verifyDpopProof']
  if (typeof verifyProof === 'function') {
    skipped.push(`DPoP proof check: gateway/dpop.js exports verifyDpopProof; its call shape is not wired into micro.ts yet (exports: ${Object.keys(dpop ?? {}).join(', ')})`)
  } else {
    skipped.push(dpop === undefined ? 'DPoP proof check: not available in this build (no gateway/dpop.js)' : `DPoP proof check: gateway/dpop.js has no export the bench knows (${Object.keys(dpop).join(', ')})`)
  }
  const replay = await built(dist, 'shared/db/replay.js')
  const replayRepository = replay?.['replayRepository'] as ((sql: Sql) => { consume: (id: string, expiresAt: Date) => Promise<boolean> }) | undefined
  const hasReplayTable = (await sql`select to_regclass('dpop_replay') is not null as present`.catch(() => [{ present: false }]))[0]?.['present'] === true
  if (replayRepository !== undefined) {
    try {
      const store = replayRepository(sql)
      await time('replay-store consume (Postgres round trip)', async () => await store.consume(randomUUID(), new Date(Date.now() + 60_000)))
    } catch (err) {
      skipped.push(`replay-store consume: failed (${err instanceof Error ? err.message : String(err)}${hasReplayTable ? '' : '; table not found'})`)
    }
  } else {
    skipped.push('replay-store consume: not available in this build (no shared/db/replay.js)')
  }

  // Brought by the audit work: the per-request enqueue (the write itself is batched).
  const audit = await built(dist, 'gateway/audit.js')
  skipped.push(audit === undefined
    ? 'audit enqueue: not available in this build (no gateway/audit.js)'
    : `audit enqueue: gateway/audit.js is present (exports: ${Object.keys(audit).join(', ')}); wire its enqueue into micro.ts`)
  for (const line of skipped) console.log(`| ${line} | | |`)
}
