import t from 'tap'
import { readFile } from 'node:fs/promises'
import type { Test } from 'tap'
import { decodeJwt, decodeProtectedHeader } from 'jose'
import { fetch as undiciFetch } from 'undici'
import type { Agent } from 'undici'
import { createEhrClient } from '../../gateway/browser/ehr-client.js'
import { closedPort } from '../helpers/assert.js'
import { ath } from '../helpers/dpop.js'
import { startGateway } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'

// The module a frontend loads, run under Node's own WebCrypto (globalThis.crypto) and fetch
// (undici, with a dispatcher presenting the workstation's certificate as a browser would).

interface Seen { readonly url: string, readonly method: string, readonly headers: Headers, readonly status: number }

function certificateFetch (agent: Agent, seen: Seen[]): typeof fetch {
  return (async (input: string, init: RequestInit = {}) => {
    const response = await undiciFetch(input, { ...(init as Record<string, unknown>), dispatcher: agent })
    seen.push({ url: input, method: init.method ?? 'GET', headers: new Headers(init.headers), status: response.status })
    return response
  }) as unknown as typeof fetch
}

async function gatewayAt (t: Test, env: Record<string, string> = {}): Promise<{ gw: TestGateway, agent: Agent, url: string }> {
  const port = await closedPort()
  const url = `https://localhost:${port}`
  const gw = await startGateway(t, { port, env: { GATEWAY_PUBLIC_URL: url, ...env } })
  const { pair } = await gw.register('ws-browser')
  return { gw, agent: gw.agent(pair), url }
}

t.test('the client module has no dependencies and is exported as ./client', async t => {
  const source = await readFile(new URL('../../gateway/browser/ehr-client.ts', import.meta.url), 'utf8')
  t.notMatch(source, /^\s*import\s/m, 'no imports at all')
  t.notMatch(source, /\bnode:|\brequire\(|\bprocess\.|\bBuffer\b/, 'nothing only Node has')
  const pkg = JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as { exports?: Record<string, unknown> }
  t.equal(pkg.exports?.['./client'], './dist/gateway/browser/ehr-client.js')
  const build = JSON.parse(await readFile(new URL('../../tsconfig.build.json', import.meta.url), 'utf8')) as { include: string[] }
  t.ok(build.include.includes('gateway'), 'built to dist with the gateway')
})

t.test('fetches a DPoP token, signs a fresh proof per request, reuses and refreshes the token', async t => {
  const { gw, agent, url } = await gatewayAt(t)
  const seen: Seen[] = []
  const ehr = createEhrClient({ gatewayUrl: url, fetch: certificateFetch(agent, seen), now: gw.clock.read })

  const res = await ehr.fetch('/fhir/Patient/1?_format=json')
  t.equal(res.status, 200)
  t.equal(((await res.json()) as Record<string, unknown>)['resourceType'], 'Patient')
  const token = await ehr.token()
  t.equal(decodeJwt(token)['cnf'] !== undefined && typeof (decodeJwt(token)['cnf'] as Record<string, unknown>)['jkt'], 'string', 'DPoP-bound')

  const post = await ehr.fetch('/fhir/Patient', { method: 'post', body: '{"resourceType":"Patient"}', headers: { 'content-type': 'application/fhir+json' } })
  t.equal(post.status, 200)
  t.equal(gw.upstream.requests.at(-1)?.method, 'POST')
  t.equal(gw.upstream.requests.at(-1)?.body.toString(), '{"resourceType":"Patient"}')

  t.equal(seen.filter(s => s.url.endsWith('/v1/token')).length, 1, 'one token for both calls')
  const proofs = seen.map(s => s.headers.get('dpop') ?? '')
  t.equal(new Set(proofs.map(p => decodeJwt(p).jti)).size, proofs.length, 'a new jti every time')
  for (const proof of proofs) {
    const header = decodeProtectedHeader(proof)
    t.equal(header.typ, 'dpop+jwt')
    t.equal(header.alg, 'ES256')
    t.same(Object.keys(header.jwk ?? {}).sort(), ['crv', 'kty', 'x', 'y'], 'the public key only')
  }
  const resourceProof = decodeJwt(proofs[1] ?? '')
  t.equal(resourceProof['htu'], `${url}/fhir/Patient/1`, 'htu without the query')
  t.equal(resourceProof['htm'], 'GET')
  t.equal(resourceProof['ath'], ath(token))
  t.equal(decodeJwt(proofs[2] ?? '')['htm'], 'POST', 'the method upper-cased as sent')

  // Refreshed before it expires: 30 s ahead by default.
  gw.clock.advance((gw.config.tokens.ttlSeconds - 20) * 1000)
  const renewed = await ehr.token()
  t.not(renewed, token, 'a new token shortly before expiry')
  t.equal((await ehr.fetch('/fhir/Patient/2')).status, 200)

  ehr.close()
  await t.rejects(ehr.fetch('/fhir/Patient/1'), /closed/)
})

t.test('concurrent callers share one token request (single flight)', async t => {
  const { agent, url, gw } = await gatewayAt(t)
  const seen: Seen[] = []
  const ehr = createEhrClient({ gatewayUrl: url, fetch: certificateFetch(agent, seen), now: gw.clock.read })
  const results = await Promise.all(Array.from({ length: 5 }, async () => await ehr.fetch('/fhir/Patient/1')))
  t.same(results.map(r => r.status), [200, 200, 200, 200, 200])
  t.equal(seen.filter(s => s.url.endsWith('/v1/token')).length, 1)
})

t.test('answers the nonce challenges of the token endpoint and of resources once', async t => {
  const { gw, agent, url } = await gatewayAt(t, { DPOP_NONCE: 'true', TOKEN_TTL_SECONDS: '3600' })
  const seen: Seen[] = []
  const ehr = createEhrClient({ gatewayUrl: url, fetch: certificateFetch(agent, seen), now: gw.clock.read })
  t.equal((await ehr.fetch('/fhir/Patient/1')).status, 200)
  t.same(seen.map(s => s.status), [400, 200, 200], 'token: use_dpop_nonce, then the token; the resource call carried the nonce')

  // The nonce ages out; the resource answers 401 use_dpop_nonce with a new one.
  gw.clock.advance(11 * 60_000)
  seen.length = 0
  t.equal((await ehr.fetch('/fhir/Patient/1')).status, 200)
  t.same(seen.map(s => s.status), [401, 200], 'one retry with the new nonce')
})

t.test('a token the gateway refuses (here: expired) is replaced once', async t => {
  const { gw, agent, url } = await gatewayAt(t)
  const seen: Seen[] = []
  // A negative margin keeps the token past its expiry, as a suspended laptop would.
  const ehr = createEhrClient({ gatewayUrl: url, fetch: certificateFetch(agent, seen), now: gw.clock.read, refreshBeforeSeconds: -100 })
  t.equal((await ehr.fetch('/fhir/Patient/1')).status, 200)
  gw.clock.advance((gw.config.tokens.ttlSeconds + 10) * 1000)
  seen.length = 0
  t.equal((await ehr.fetch('/fhir/Patient/1')).status, 200)
  t.same(seen.map(s => s.status), [401, 200, 200], 'refused as expired, a new token, the call again')
})
