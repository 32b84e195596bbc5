import t from 'tap'
import { X509Certificate, createHash } from 'node:crypto'
import { decodeJwt } from 'jose'
import { Agent } from 'undici'
import type { Test } from 'tap'
import { createDevCa } from '../../gateway/demo/pki.js'
import type { KeyPair } from '../../gateway/demo/pki.js'
import { startGateway } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'
import { assertProblem } from '../helpers/assert.js'

type Response = Awaited<ReturnType<TestGateway['call']>>

const DAY_MS = 24 * 60 * 60 * 1000
const bearer = (token: string): Record<string, string> => ({ authorization: `Bearer ${token}` })

// What Envoy writes with forward_client_cert_details: SANITIZE_SET and
// set_current_client_cert_details { subject: true, cert: true }.
function xfcc (pair: KeyPair, extra = ''): string {
  const der = new X509Certificate(pair.cert).raw
  const hash = createHash('sha256').update(der).digest('hex')
  return `By=spiffe://lb.hospital/envoy;Hash=${hash};Cert="${encodeURIComponent(pair.cert)}";Subject="CN=ws,O=Hospital; Ward=3";URI=${extra}`
}
// nginx's $ssl_client_escaped_cert
const escaped = (pair: KeyPair): string => encodeURIComponent(pair.cert)

// The test client stands in for the load balancer: it connects from 127.0.0.1 (trusted)
// without a client certificate of its own, as a TLS-terminating proxy does.
t.test('behind a trusted proxy (TRUSTED_PROXIES=127.0.0.1/32)', async t => {
  // `gw` stands behind nginx (X-SSL-Client-Cert), `envoy` behind Envoy (XFCC, the default):
  // one database, PKI and upstream, so a machine registered once is known to both.
  const gw = await startGateway(t, { env: { TRUSTED_PROXIES: '127.0.0.1/32', FORWARDED_CERT_HEADER: 'x-ssl-client-cert' } })
  const envoy = await startGateway(t, { db: gw.db, pki: gw.pki, upstream: gw.upstream, env: { TRUSTED_PROXIES: '127.0.0.1/32' } })
  const { pair, machine } = await gw.register('ws-behind-lb')
  const proxy = gw.agent()

  await t.test('XFCC: the forwarded certificate identifies the machine; the token binds to it and to X-Forwarded-For', async t => {
    const headers = { 'x-forwarded-client-cert': xfcc(pair), 'x-forwarded-for': '203.0.113.9, 198.51.100.7' }
    const res = await envoy.call(proxy, '/v1/token', { method: 'POST', headers })
    t.equal(res.status, 200, res.text)
    const token = res.json()['access_token'] as string
    const claims = decodeJwt(token)
    t.equal(claims.sub, machine.id)
    t.equal((claims['cnf'] as Record<string, string>)['x5t#S256'], machine.fingerprint, 'cnf is the forwarded certificate')
    t.equal(claims['ip'], '198.51.100.7', 'the right-most untrusted hop of X-Forwarded-For')

    const before = envoy.upstream.requests.length
    const ok = await envoy.call(proxy, '/fhir/Patient/1', { headers: { ...headers, ...bearer(token) } })
    t.equal(ok.status, 200, ok.text)
    const seen = envoy.upstream.requests.at(-1)?.headers ?? {}
    t.equal(envoy.upstream.requests.length, before + 1)
    for (const name of ['x-forwarded-client-cert', 'x-ssl-client-cert', 'x-forwarded-for']) t.equal(seen[name], undefined, `${name} not forwarded upstream`)

    // the same token from another address behind the proxy, or with no forwarded certificate
    assertProblem(t, await envoy.call(proxy, '/fhir/Patient/1', { headers: { ...headers, 'x-forwarded-for': '198.51.100.8', ...bearer(token) } }), 401, 'TOKEN_WRONG_IP')
    assertProblem(t, await envoy.call(proxy, '/fhir/Patient/1', { headers: { 'x-forwarded-for': '198.51.100.7', ...bearer(token) } }), 401, 'CLIENT_CERT_REQUIRED')
  })

  await t.test('X-SSL-Client-Cert (nginx): the same identity path', async t => {
    const headers = { 'x-ssl-client-cert': escaped(pair), 'x-forwarded-for': '198.51.100.7' }
    const token = (await gw.call(proxy, '/v1/token', { method: 'POST', headers })).json()['access_token'] as string
    t.equal((await gw.call(proxy, '/fhir/Patient/1', { headers: { ...headers, ...bearer(token) } })).status, 200)
    // the same certificate behind Envoy's header is the same machine
    const viaEnvoy = await envoy.call(proxy, '/v1/token', { method: 'POST', headers: { 'x-forwarded-client-cert': xfcc(pair) } })
    t.equal(decodeJwt(viaEnvoy.json()['access_token'] as string).sub, machine.id)
  })

  await t.test('one proxy connection, many workstations: no identity leaks between them', async t => {
    const b = await gw.register('ws-b')
    const tokenB = (await gw.call(proxy, '/v1/token', { method: 'POST', headers: { 'x-ssl-client-cert': escaped(b.pair) } })).json()['access_token'] as string
    const tokenA = (await gw.call(proxy, '/v1/token', { method: 'POST', headers: { 'x-ssl-client-cert': escaped(pair) } })).json()['access_token'] as string
    t.equal(decodeJwt(tokenB).sub, b.machine.id)
    t.equal(decodeJwt(tokenA).sub, machine.id)
    assertProblem(t, await gw.call(proxy, '/fhir/Patient/1', { headers: { 'x-ssl-client-cert': escaped(pair), ...bearer(tokenB) } }), 401, 'TOKEN_WRONG_MACHINE')
    t.equal((await gw.call(proxy, '/fhir/Patient/1', { headers: { 'x-ssl-client-cert': escaped(b.pair), ...bearer(tokenB) } })).status, 200)
  })

  await t.test('a forwarded certificate must still chain to TLS_CLIENT_CA_FILE and be current', async t => {
    const rogueCa = await createDevCa()
    const rogue = await rogueCa.issueClient({ commonName: 'ws-behind-lb' })
    await assertRefused(t, envoy, proxy, { 'x-forwarded-client-cert': xfcc(rogue) }, 401, 'CLIENT_CERT_UNTRUSTED')
    await assertRefused(t, gw, proxy, { 'x-ssl-client-cert': escaped(rogue) }, 401, 'CLIENT_CERT_UNTRUSTED')
    const expired = await gw.pki.ca.issueClient({ commonName: 'old', notBefore: new Date(Date.now() - 10 * DAY_MS), notAfter: new Date(Date.now() - DAY_MS) })
    await assertRefused(t, gw, proxy, { 'x-ssl-client-cert': escaped(expired) }, 401, 'CLIENT_CERT_UNTRUSTED')
    const caItself = { cert: gw.pki.ca.cert, key: '' }
    await assertRefused(t, gw, proxy, { 'x-ssl-client-cert': escaped(caItself) }, 401, 'CLIENT_CERT_UNTRUSTED')
  })

  await t.test('validity follows the clock, also for a header already seen', async t => {
    const short = await gw.pki.ca.issueClient({ commonName: 'short', notAfter: new Date(gw.clock.now + 60_000) })
    await gw.register('ws-short', short)
    const headers = { 'x-ssl-client-cert': escaped(short) }
    t.equal((await gw.call(proxy, '/v1/token', { method: 'POST', headers })).status, 200)
    gw.clock.advance(120_000)
    await assertRefused(t, gw, proxy, headers, 401, 'CLIENT_CERT_UNTRUSTED')
    gw.clock.advance(-120_000)
  })

  await t.test('an unregistered or revoked forwarded certificate: the registry decides, as for TLS', async t => {
    const stranger = await gw.pki.ca.issueClient({ commonName: 'stranger' })
    await assertRefused(t, gw, proxy, { 'x-ssl-client-cert': escaped(stranger) }, 403, 'MACHINE_NOT_REGISTERED')
  })

  await t.test('malformed headers from the trusted proxy: coded 400, never a crash', async t => {
    const hash = createHash('sha256').update('other').digest('hex')
    const cases: Array<[string, Record<string, string>]> = [
      ['XFCC without Cert', { 'x-forwarded-client-cert': 'By=spiffe://lb;Hash=abc;Subject="CN=x"' }],
      ['XFCC with an unclosed quote', { 'x-forwarded-client-cert': `Cert="${escaped(pair)}` }],
      ['XFCC that is not key=value', { 'x-forwarded-client-cert': 'garbage' }],
      ['XFCC with two Cert values', { 'x-forwarded-client-cert': `Cert="${escaped(pair)}";Cert="${escaped(pair)}"` }],
      ['XFCC whose Hash is of another certificate', { 'x-forwarded-client-cert': `Hash=${hash};Cert="${escaped(pair)}"` }],
      ['XFCC with an empty element', { 'x-forwarded-client-cert': `Cert="${escaped(pair)}",,` }],
      ['XFCC Cert that is not a certificate', { 'x-forwarded-client-cert': 'Cert="-----BEGIN%20CERTIFICATE-----%0Anope%0A-----END%20CERTIFICATE-----"' }],
      ['bad URL encoding', { 'x-ssl-client-cert': '%E0%A4%A' }],
      ['nginx header that is not PEM', { 'x-ssl-client-cert': 'MIIBxyz' }],
      ['X-Forwarded-For that is no address', { 'x-forwarded-for': 'not-an-ip', 'x-ssl-client-cert': escaped(pair) }]
    ]
    for (const [what, headers] of cases) {
      t.comment(what)
      const behind = 'x-forwarded-client-cert' in headers ? envoy : gw
      await assertRefused(t, behind, proxy, headers, 400, 'FORWARDED_HEADER_INVALID')
    }
    t.equal((await envoy.call(proxy, '/.well-known/jwks.json', { headers: { 'x-forwarded-client-cert': 'garbage' } })).status, 200, 'routes without identity are unaffected')
  })

  await t.test('XFCC through two proxies: the element the nearest proxy appended counts', async t => {
    const stranger = await gw.pki.ca.issueClient({ commonName: 'first-hop' })
    const chained = `${xfcc(stranger)},${xfcc(pair)}`
    const res = await envoy.call(proxy, '/v1/token', { method: 'POST', headers: { 'x-forwarded-client-cert': chained } })
    t.equal(res.status, 200, res.text)
    t.equal(decodeJwt(res.json()['access_token'] as string).sub, machine.id)
    // and the other way round the first-hop certificate (unregistered) decides
    await assertRefused(t, envoy, proxy, { 'x-forwarded-client-cert': `${xfcc(pair)},${xfcc(stranger)}` }, 403, 'MACHINE_NOT_REGISTERED')
  })

  // Envoy's SANITIZE_SET rewrites XFCC but passes a client's own X-SSL-Client-Cert on, and
  // nginx passes a client's XFCC on: only the header the proxy sets may be believed.
  await t.test('the certificate header the proxy does not set is refused, even from the trusted proxy', async t => {
    const before = envoy.upstream.requests.length
    await assertRefused(t, envoy, proxy, { 'x-ssl-client-cert': escaped(pair) }, 400, 'FORWARDED_HEADER_UNTRUSTED')
    await assertRefused(t, envoy, proxy, { 'x-ssl-client-cert': escaped(pair), 'x-forwarded-client-cert': '' }, 400, 'FORWARDED_HEADER_UNTRUSTED')
    await assertRefused(t, gw, proxy, { 'x-forwarded-client-cert': xfcc(pair) }, 400, 'FORWARDED_HEADER_UNTRUSTED')
    await assertRefused(t, gw, proxy, { 'x-ssl-client-cert': escaped(pair), 'x-forwarded-client-cert': xfcc(pair) }, 400, 'FORWARDED_HEADER_UNTRUSTED')
    t.equal(envoy.upstream.requests.length, before, 'nothing reached the upstream')
  })

  await t.test('no forwarded certificate and no TLS certificate: CLIENT_CERT_REQUIRED as without a proxy', async t => {
    await assertRefused(t, gw, proxy, { 'x-forwarded-for': '198.51.100.7' }, 401, 'CLIENT_CERT_REQUIRED')
    await assertRefused(t, gw, proxy, { 'x-ssl-client-cert': '' }, 401, 'CLIENT_CERT_REQUIRED')
  })

  await t.test('refusals are in the access log with their code', async t => {
    t.match(gw.logs.join(''), /FORWARDED_HEADER_INVALID/)
  })

  await t.test('a peer outside TRUSTED_PROXIES: the headers are a spoofing attempt', async t => {
    // the attacker even holds a valid machine certificate of its own
    const own = await gw.register('ws-attacker')
    const elsewhere = new Agent({ localAddress: '127.0.0.2', connect: { ca: gw.pki.ca.cert, cert: own.pair.cert, key: own.pair.key } })
    t.teardown(async () => { await elsewhere.close() })
    const before = gw.upstream.requests.length
    const token = (await gw.call(elsewhere, '/v1/token', { method: 'POST' })).json()['access_token'] as string
    const spoofs: Array<Record<string, string>> = [{ 'x-forwarded-client-cert': xfcc(pair) }, { 'x-ssl-client-cert': escaped(pair) }, { 'x-ssl-client-cert': '' }]
    for (const headers of spoofs) {
      assertProblem(t, await gw.call(elsewhere, '/v1/token', { method: 'POST', headers }), 400, 'FORWARDED_HEADER_UNTRUSTED')
      assertProblem(t, await gw.call(elsewhere, '/fhir/Patient/1', { headers: { ...headers, ...bearer(token) } }), 400, 'FORWARDED_HEADER_UNTRUSTED')
    }
    t.equal(gw.upstream.requests.length, before, 'nothing reached the upstream')
    t.match(gw.logs.join(''), /client-certificate header from an untrusted peer refused/)
    // X-Forwarded-For from an untrusted peer is ignored (the address stays the socket's)
    const res = await gw.call(elsewhere, '/fhir/Patient/1', { headers: { 'x-forwarded-for': '198.51.100.7', ...bearer(token) } })
    t.equal(res.status, 200)
    t.equal(decodeJwt(token)['ip'], '127.0.0.2')
  })
})

t.test('the rate limit key behind a proxy is the forwarded certificate', async t => {
  const gw = await startGateway(t, { env: { TRUSTED_PROXIES: '127.0.0.1', FORWARDED_CERT_HEADER: 'x-ssl-client-cert', RATE_LIMIT_MAX: '2' } })
  const a = await gw.register('ws-a')
  const b = await gw.register('ws-b')
  const proxy = gw.agent()
  for (const who of [a, b]) {
    const headers = { 'x-ssl-client-cert': escaped(who.pair) }
    t.equal((await gw.call(proxy, '/v1/token', { method: 'POST', headers })).status, 200)
    t.equal((await gw.call(proxy, '/v1/token', { method: 'POST', headers })).status, 200)
    assertProblem(t, await gw.call(proxy, '/v1/token', { method: 'POST', headers }), 429, 'RATE_LIMITED')
  }
})

async function assertRefused (t: Test, gw: TestGateway, agent: Agent, headers: Record<string, string>, status: number, code: string): Promise<void> {
  const res: Response = await gw.call(agent, '/v1/token', { method: 'POST', headers })
  assertProblem(t, res, status, code)
  const before = gw.upstream.requests.length
  assertProblem(t, await gw.call(agent, '/fhir/Patient/1', { headers: { ...headers, authorization: 'Bearer a.b.c' } }), status, code)
  t.equal(gw.upstream.requests.length, before, 'not proxied')
}
