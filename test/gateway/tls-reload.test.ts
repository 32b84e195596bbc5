import { X509Certificate } from 'node:crypto'
import { mkdir, mkdtemp, rename, rm, symlink, writeFile } from 'node:fs/promises'
import { Agent, request } from 'node:https'
import type { IncomingHttpHeaders } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { TLSSocket } from 'node:tls'
import t from 'tap'
import type { Test } from 'tap'
import { createDevCa } from '../../gateway/demo/pki.js'
import type { DevCa, KeyPair } from '../../gateway/demo/pki.js'
import { assertProblem } from '../helpers/assert.js'
import { createPki, startGateway } from '../helpers/gateway.js'
import type { Pki, TestGateway } from '../helpers/gateway.js'

interface Answer {
  readonly status: number
  readonly headers: IncomingHttpHeaders
  readonly text: string
  json(): Record<string, unknown>
  readonly socket: TLSSocket
  readonly reused: boolean
  readonly serverFingerprint: string
}

// node:https rather than undici: the response names the socket it came on, so a test can
// tell a kept-alive connection from a new one and read the certificate it was served.
function call (gw: TestGateway, agent: Agent, path: string, method = 'GET'): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = request(`${gw.url}${path}`, { agent, method }, res => {
      // Read now: once the body ends, a kept-alive socket goes back to the agent.
      const socket = res.socket as TLSSocket
      const serverFingerprint = socket.getPeerX509Certificate()?.fingerprint256 ?? ''
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => { text += chunk })
      res.on('end', () => {
        resolve({
          status: res.statusCode ?? 0,
          headers: res.headers,
          text,
          json: () => JSON.parse(text) as Record<string, unknown>,
          socket,
          reused: req.reusedSocket,
          serverFingerprint
        })
      })
    })
    req.on('error', reject)
    req.end()
  })
}

// One kept-alive connection per agent, so its second request goes where the first went.
function keepAliveAgent (t: Test, ca: string, pair?: KeyPair): Agent {
  const agent = new Agent({ keepAlive: true, maxSockets: 1, ca, ...(pair ?? {}) })
  t.teardown(() => { agent.destroy() })
  return agent
}

async function waitFor (what: string, check: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const until = Date.now() + ms
  while (!await check()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 25))
  }
}

const reloads = (gw: TestGateway, msg: string): number => gw.logs.filter(l => l.includes(msg)).length
const RELOADED = 'TLS certificate and client CA reloaded'
const REFUSED = 'TLS reload refused'

// A Kubernetes secret volume as the kubelet writes it (AtomicWriter): the files are
// symlinks through `..data`, itself a symlink to a timestamped directory that an update
// replaces by renaming a new `..data` over the old one.
interface SecretVolume { readonly dir: string, update(files: Record<string, string>): Promise<void> }

async function secretVolume (t: Test, files: Record<string, string>): Promise<SecretVolume> {
  const dir = await mkdtemp(join(tmpdir(), 'ehrgw-secret-'))
  t.teardown(async () => { await rm(dir, { recursive: true, force: true }) })
  let generation = 0
  let current: string | undefined
  const update = async (next: Record<string, string>): Promise<void> => {
    const stamp = `..2026_12_03_12_00_00.${++generation}`
    await mkdir(join(dir, stamp))
    for (const [name, content] of Object.entries(next)) await writeFile(join(dir, stamp, name), content)
    await symlink(stamp, join(dir, '..data_tmp'))
    await rename(join(dir, '..data_tmp'), join(dir, '..data'))
    for (const name of Object.keys(next)) await symlink(join('..data', name), join(dir, name)).catch(() => {})
    if (current !== undefined) await rm(join(dir, current), { recursive: true })
    current = stamp
  }
  await update(files)
  return { dir, update }
}

async function k8sPki (t: Test): Promise<{ pki: Pki, volume: SecretVolume, server: KeyPair }> {
  const base = await createPki(t)
  const server = await base.ca.issueServer({ commonName: 'localhost' })
  const volume = await secretVolume(t, { 'tls.crt': server.cert, 'tls.key': server.key, 'ca.crt': base.ca.cert })
  const pki: Pki = { ca: base.ca, dir: volume.dir, caFile: join(volume.dir, 'ca.crt'), certFile: join(volume.dir, 'tls.crt'), keyFile: join(volume.dir, 'tls.key') }
  return { pki, volume, server }
}

async function served (gw: TestGateway, t: Test): Promise<string> {
  return (await call(gw, keepAliveAgent(t, gw.pki.ca.cert), '/.well-known/jwks.json')).serverFingerprint
}

t.test('a Kubernetes secret update rotates the certificate under an open keep-alive connection', async t => {
  const { pki, volume } = await k8sPki(t)
  const gw = await startGateway(t, { pki })
  const { pair } = await gw.register('ws-keepalive')
  const agent = keepAliveAgent(t, pki.ca.cert, pair)

  const before = await call(gw, agent, '/v1/token', 'POST')
  t.equal(before.status, 200)
  const oldFingerprint = before.serverFingerprint
  // Sessions are resumed when nothing changed (so the check after the CA removal below means something).
  const probe = keepAliveAgent(t, pki.ca.cert, pair)
  const first = await call(gw, probe, '/v1/token', 'POST')
  await new Promise(resolve => { first.socket.once('close', resolve).destroy() })
  t.ok((await call(gw, probe, '/v1/token', 'POST')).socket.isSessionReused(), 'TLS session resumption is on')

  const next = await pki.ca.issueServer({ commonName: 'localhost' })
  await volume.update({ 'tls.crt': next.cert, 'tls.key': next.key, 'ca.crt': pki.ca.cert })
  await waitFor('the reload', () => reloads(gw, RELOADED) === 1)

  const kept = await call(gw, agent, '/v1/token', 'POST')
  t.equal(kept.status, 200, 'the open connection keeps working')
  t.ok(kept.reused, 'on the same connection')
  t.equal(kept.socket, before.socket, 'whose handshake, and certificate, came before the rotation')

  const fresh = await call(gw, keepAliveAgent(t, pki.ca.cert, pair), '/v1/token', 'POST')
  t.equal(fresh.status, 200)
  t.notOk(fresh.reused)
  t.not(fresh.serverFingerprint, oldFingerprint, 'a new connection gets the new certificate')
  t.equal(fresh.serverFingerprint, new X509Certificate(next.cert).fingerprint256)

  // A second update that changes nothing is no reload.
  await volume.update({ 'tls.crt': next.cert, 'tls.key': next.key, 'ca.crt': pki.ca.cert })
  await new Promise(resolve => setTimeout(resolve, 600))
  t.equal(reloads(gw, RELOADED), 1, 'identical content: nothing reloaded')
  const metrics = await gw.app.gateway.metrics.registry.getSingleMetricAsString('ehr_gateway_tls_reloads_total')
  t.match(metrics, /ehr_gateway_tls_reloads_total\{result="reloaded"\} 1/)
  t.match(metrics, /ehr_gateway_tls_reloads_total\{result="unchanged"\} [1-9]/)
})

t.test('an in-place rewrite of the certificate and key files is picked up', async t => {
  const gw = await startGateway(t)
  const before = await served(gw, t)
  const next = await gw.pki.ca.issueServer({ commonName: 'localhost' })
  // What `cp` or an editor does: the same inodes, truncated and written, one file after the other.
  await writeFile(gw.pki.certFile, next.cert)
  await writeFile(gw.pki.keyFile, next.key)
  await waitFor('the new certificate', async () => await served(gw, t) !== before)
  t.equal(await served(gw, t), new X509Certificate(next.cert).fingerprint256)
  const expiry = await gw.app.gateway.metrics.registry.getSingleMetricAsString('ehr_gateway_tls_certificate_expiry_timestamp_seconds')
  t.match(expiry, /_seconds \d{10}/)
})

t.test('a bad new file keeps the previous context and says why', async t => {
  const { pki, volume, server } = await k8sPki(t)
  const gw = await startGateway(t, { pki })
  const before = await served(gw, t)
  const other = await pki.ca.issueServer({ commonName: 'localhost' })
  const cases: Array<[string, Record<string, string>, RegExp]> = [
    ['not PEM at all', { 'tls.crt': 'garbage', 'tls.key': server.key, 'ca.crt': pki.ca.cert }, /tls\.crt does not hold a PEM certificate/],
    ['a certificate cut off half-way', { 'tls.crt': other.cert.slice(0, other.cert.length / 2), 'tls.key': other.key, 'ca.crt': pki.ca.cert }, /tls\.crt does not hold a PEM certificate/],
    ['a new certificate with the old key', { 'tls.crt': other.cert, 'tls.key': server.key, 'ca.crt': pki.ca.cert }, /tls\.key is not the key of the certificate/],
    ['a key cut off half-way', { 'tls.crt': other.cert, 'tls.key': other.key.slice(0, 60), 'ca.crt': pki.ca.cert }, /tls\.key does not hold a PEM private key/],
    ['an empty CA bundle', { 'tls.crt': other.cert, 'tls.key': other.key, 'ca.crt': '' }, /ca\.crt does not hold a bundle of PEM CA certificates/]
  ]
  for (const [name, files, reason] of cases) {
    const refusedBefore = reloads(gw, REFUSED)
    await volume.update(files)
    await waitFor(`the refusal of ${name}`, () => reloads(gw, REFUSED) > refusedBefore)
    const line = gw.logs.filter(l => l.includes(REFUSED)).at(-1) ?? ''
    t.match(line, reason, `${name}: the log says why`)
    t.match(JSON.parse(line), { level: 50, trigger: 'file change' })
    t.notMatch(line, 'PRIVATE KEY', 'and never prints key material')
    t.equal(await served(gw, t), before, `${name}: the previous certificate is still served`)
  }
  t.equal(reloads(gw, RELOADED), 0)
  const metrics = await gw.app.gateway.metrics.registry.getSingleMetricAsString('ehr_gateway_tls_reloads_total')
  t.match(metrics, /result="failed"\} [5-9]/)

  await volume.update({ 'tls.crt': other.cert, 'tls.key': other.key, 'ca.crt': pki.ca.cert })
  await waitFor('the good files', () => reloads(gw, RELOADED) === 1)
  t.not(await served(gw, t), before, 'good files are served once they arrive')
})

t.test('the client CA bundle: a new CA admits its machines, a removed CA shuts them out', async t => {
  const { pki, volume, server } = await k8sPki(t)
  const gw = await startGateway(t, { pki })
  const otherCa: DevCa = await createDevCa({ commonName: 'second hospital CA' })
  const { pair: newcomer } = await gw.register('ws-other-ca', await otherCa.issueClient({ commonName: 'ws-other-ca' }))
  const { pair: resident } = await gw.register('ws-first-ca')

  assertProblem(t, await call(gw, keepAliveAgent(t, pki.ca.cert, newcomer), '/v1/token', 'POST'), 401, 'CLIENT_CERT_UNTRUSTED')

  await volume.update({ 'tls.crt': server.cert, 'tls.key': server.key, 'ca.crt': pki.ca.cert + otherCa.cert })
  await waitFor('the CA reload', () => reloads(gw, RELOADED) === 1)
  const newcomerAgent = keepAliveAgent(t, pki.ca.cert, newcomer)
  const residentAgent = keepAliveAgent(t, pki.ca.cert, resident)
  const admitted = await call(gw, newcomerAgent, '/v1/token', 'POST')
  t.equal(admitted.status, 200, 'a machine of the added CA is admitted')
  t.equal((await call(gw, residentAgent, '/v1/token', 'POST')).status, 200)

  await volume.update({ 'tls.crt': server.cert, 'tls.key': server.key, 'ca.crt': pki.ca.cert })
  await waitFor('the CA removal', () => reloads(gw, RELOADED) === 2)
  t.match(gw.logs.filter(l => l.includes(RELOADED)).at(-1), /"distrustedConnections":1/)

  assertProblem(t, await call(gw, keepAliveAgent(t, pki.ca.cert, newcomer), '/v1/token', 'POST'), 401, 'CLIENT_CERT_UNTRUSTED')
  // The connection it opened while its CA was trusted stays open, but serves it no more.
  const stale = await call(gw, newcomerAgent, '/v1/token', 'POST')
  t.ok(stale.reused)
  t.equal(stale.socket, admitted.socket)
  assertProblem(t, stale, 401, 'CLIENT_CERT_UNTRUSTED')
  // A new connection offering the TLS session of the old one (node:https caches it) is
  // no way back in either.
  await new Promise(resolve => { stale.socket.once('close', resolve).destroy() })
  const resumed = await call(gw, newcomerAgent, '/v1/token', 'POST')
  t.not(resumed.socket, stale.socket)
  t.notOk(resumed.socket.isSessionReused(), 'the reload invalidated the session tickets')
  assertProblem(t, resumed, 401, 'CLIENT_CERT_UNTRUSTED')
  const residentAfter = await call(gw, residentAgent, '/v1/token', 'POST')
  t.equal(residentAfter.status, 200, 'machines of the remaining CA are unaffected')
  t.ok(residentAfter.reused)
})

t.test('reload() re-reads on demand; close() stops watching', async t => {
  const gw = await startGateway(t)
  const reloader = gw.app.gateway.tls
  if (reloader === null) throw new Error('no reloader')
  t.equal(reloader.reload('SIGHUP'), 'unchanged')
  t.equal(reloader.clientCas.length, 1)
  const next = await gw.pki.ca.issueServer({ commonName: 'localhost' })
  reloader.close()
  await writeFile(gw.pki.certFile, next.cert)
  await writeFile(gw.pki.keyFile, next.key)
  await new Promise(resolve => setTimeout(resolve, 600))
  t.equal(reloads(gw, RELOADED), 0, 'no watcher after close')
  t.equal(reloader.reload('SIGHUP'), 'reloaded')
  t.match(gw.logs.filter(l => l.includes(RELOADED)).at(-1), /"trigger":"SIGHUP"/)
})

// Certificates forwarded by a trusted proxy are checked against the CA bundle in code
// (gateway/forwarded.ts); a reload reaches that check too, in both directions.
t.test('a reloaded CA bundle also decides forwarded client certificates', async t => {
  const { pki, volume, server } = await k8sPki(t)
  const gw = await startGateway(t, { pki, env: { TRUSTED_PROXIES: '127.0.0.1/32', FORWARDED_CERT_HEADER: 'x-ssl-client-cert' } })
  const otherCa = await createDevCa({ commonName: 'second hospital CA' })
  const { pair } = await gw.register('ws-behind-lb-other-ca', await otherCa.issueClient({ commonName: 'ws-behind-lb-other-ca' }))
  const proxy = gw.agent()
  const forwarded = { 'x-ssl-client-cert': encodeURIComponent(pair.cert) }

  assertProblem(t, await gw.call(proxy, '/v1/token', { method: 'POST', headers: forwarded }), 401, 'CLIENT_CERT_UNTRUSTED')
  await volume.update({ 'tls.crt': server.cert, 'tls.key': server.key, 'ca.crt': pki.ca.cert + otherCa.cert })
  await waitFor('the CA reload', () => reloads(gw, RELOADED) === 1)
  t.equal((await gw.call(proxy, '/v1/token', { method: 'POST', headers: forwarded })).status, 200, 'admitted once its CA is trusted')
  await volume.update({ 'tls.crt': server.cert, 'tls.key': server.key, 'ca.crt': pki.ca.cert })
  await waitFor('the CA removal', () => reloads(gw, RELOADED) === 2)
  assertProblem(t, await gw.call(proxy, '/v1/token', { method: 'POST', headers: forwarded }), 401, 'CLIENT_CERT_UNTRUSTED')
})
