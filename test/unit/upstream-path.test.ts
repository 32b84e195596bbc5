import t from 'tap'
import { Readable } from 'node:stream'
import { errors as undiciErrors } from 'undici'
import { withoutQueryValues } from '../../gateway/app.js'
import { clientResponseHeaders, limitBody, translateUpstreamError, upstreamPath, upstreamRequestHeaders } from '../../gateway/upstream.js'
import { GatewayError } from '../../shared/errors.js'

const PREFIX = '/fhir'
const BASE = '/base'

t.test('upstreamPath maps allowed paths under the base path, still encoded', async t => {
  const allowed: Array<[string, string]> = [
    ['/fhir', '/base'],
    ['/fhir/', '/base/'],
    ['/fhir?_count=1', '/base?_count=1'],
    ['/fhir/Patient/1', '/base/Patient/1'],
    ['/fhir/Patient/', '/base/Patient/'],
    ['/fhir/Patient?name=a&b=c', '/base/Patient?name=a&b=c'],
    ['/fhir/Patient/$everything', '/base/Patient/$everything'],
    ['/fhir/Patient/a%20b', '/base/Patient/a%20b'],
    ['/fhir/Patient/.well', '/base/Patient/.well'],
    ['/fhir/Patient/...', '/base/Patient/...'],
    // dots and slashes in the query are data, not path
    ['/fhir/Patient?x=../../admin', '/base/Patient?x=../../admin'],
    ['/fhir/Observation?subject=Patient/1&code=a%2Fb', '/base/Observation?subject=Patient/1&code=a%2Fb']
  ]
  for (const [raw, expected] of allowed) {
    t.equal(upstreamPath(raw, PREFIX, BASE), expected, raw)
  }
})

t.test('upstreamPath refuses paths that could escape the base or parse ambiguously', async t => {
  const refused = [
    '/fhir/../x',
    '/fhir/..',
    '/fhir/Patient/..',
    '/fhir/Patient/../..',
    '/fhir/%2e%2e/x',
    '/fhir/%2E%2e/x',
    '/fhir/%2E%2E/x',
    '/fhir/.%2e/x',
    '/fhir/%2e./x',
    '/fhir/%2e/x',
    '/fhir/./x',
    '/fhir/.',
    '/fhir/Patient%2f..%2fadmin',
    '/fhir/Patient%2F..%2Fadmin',
    '/fhir/Patient%5c..',
    '/fhir/Patient%5C..',
    '/fhir/Patient\\..',
    '/fhir//evil.example/x',
    '/fhir/a//b',
    '/fhirx/Patient',
    '/fhi',
    '/other/fhir/Patient',
    '/fhir/%zz',
    '/fhir/%',
    '/fhir/%C0%AE%C0%AE/x', // overlong UTF-8 '.', invalid for decodeURIComponent
    '/fhir/a%00b',
    '/fhir/a%0ab',
    '/fhir/a%7fb',
    '/fhir/a\u0000b',
    '/fhir/Patient#x',
    '/fhir/Patient?x=1#frag'
  ]
  for (const raw of refused) {
    t.equal(upstreamPath(raw, PREFIX, BASE), undefined, JSON.stringify(raw))
  }
})

t.test('upstreamPath with a base path that ends in a slash', async t => {
  t.equal(upstreamPath('/fhir/Patient/1', PREFIX, '/base/'), '/base/Patient/1')
  t.equal(upstreamPath('/fhir/Patient/1', PREFIX, '/'), '/Patient/1')
})

// EHR_UPSTREAM_URL without a path (https://ehr.example) has pathname '/': the bare prefix
// must map to '/', since undici refuses a path that does not start with '/'.
t.test('upstreamPath for the bare prefix when the upstream URL has no path', async t => {
  t.equal(upstreamPath('/fhir', PREFIX, '/'), '/', 'bare prefix → /')
  t.equal(upstreamPath('/fhir?_count=1', PREFIX, '/'), '/?_count=1', 'bare prefix with a query')
  t.equal(upstreamPath('/fhir/', PREFIX, '/'), '/')
})

// Servlet containers (Tomcat, Jetty: HAPI FHIR's usual home) strip `;params` from a segment
// before resolving dot segments, so `..;` is `..` to them. upstreamPath's own comment promises
// to refuse what "could mean different things to different parsers".
t.test('upstreamPath refuses dot segments with path parameters', async t => {
  for (const raw of ['/fhir/..;/admin', '/fhir/..;jsessionid=1/admin', '/fhir/%2e%2e;/admin', '/fhir/Patient/..%3b/admin', '/fhir/.;/x']) {
    t.equal(upstreamPath(raw, PREFIX, BASE), undefined, raw)
  }
  t.equal(upstreamPath('/fhir/Patient;v=1/1', PREFIX, BASE), '/base/Patient;v=1/1', 'other path parameters are left alone')
})

const API_HEADER = 'x-api-key'
const OUR_KEY = 'our-secret-key'

t.test('upstreamRequestHeaders strips hop-by-hop, client credentials and forwarded identity', async t => {
  const out = upstreamRequestHeaders({
    host: 'gateway.test',
    connection: 'keep-alive, X-Secret,  x-other ',
    'keep-alive': 'timeout=5',
    'proxy-connection': 'keep-alive',
    'proxy-authorization': 'Basic Zm9vOmJhcg==',
    te: 'trailers',
    trailer: 'x-t',
    'transfer-encoding': 'chunked',
    upgrade: 'websocket',
    expect: '100-continue',
    'x-secret': '1',
    'x-other': '2',
    authorization: 'Bearer client-token',
    cookie: 'session=abc',
    dpop: 'proof',
    'x-forwarded-client-cert': 'Hash=abc',
    'x-ssl-client-cert': '-----BEGIN CERTIFICATE-----',
    'x-client-cert': 'x',
    'ssl-client-cert': 'x',
    forwarded: 'for=1.2.3.4',
    'x-forwarded-for': '1.2.3.4',
    'x-forwarded-host': 'evil',
    'x-forwarded-proto': 'http',
    'x-real-ip': '1.2.3.4',
    'x-request-id': 'client-chosen',
    'x-api-key': 'attacker',
    accept: 'application/fhir+json',
    'content-type': 'application/fhir+json',
    'content-length': '12',
    'if-match': 'W/"1"',
    prefer: 'return=minimal'
  }, API_HEADER, { [API_HEADER]: OUR_KEY }, 'req-1')
  t.same(out, {
    accept: 'application/fhir+json',
    'content-type': 'application/fhir+json',
    'content-length': '12',
    'if-match': 'W/"1"',
    prefer: 'return=minimal',
    'x-api-key': OUR_KEY,
    'x-request-id': 'req-1'
  })
})

t.test('upstreamRequestHeaders with no API key still drops the client-sent one', async t => {
  const out = upstreamRequestHeaders({ 'x-api-key': 'attacker', accept: '*/*' }, API_HEADER, {}, 'req-2')
  t.same(out, { accept: '*/*', 'x-request-id': 'req-2' })
})

t.test('upstreamRequestHeaders with a custom API key header', async t => {
  const out = upstreamRequestHeaders({ 'x-goog-api-key': 'attacker', 'x-api-key': 'passes' }, 'x-goog-api-key', { 'x-goog-api-key': OUR_KEY }, 'req-3')
  t.same(out, { 'x-api-key': 'passes', 'x-goog-api-key': OUR_KEY, 'x-request-id': 'req-3' })
})

t.test('a Connection header cannot remove our API key or request id', async t => {
  const out = upstreamRequestHeaders({ connection: 'x-api-key, x-request-id' }, API_HEADER, { [API_HEADER]: OUR_KEY }, 'req-4')
  t.same(out, { 'x-api-key': OUR_KEY, 'x-request-id': 'req-4' })
})

const REWRITE = { upstreamBase: 'http://ehr.internal:8080/base', upstreamBasePath: '/base', proxyPrefix: '/fhir' }
const NOT_OURS = (): boolean => false

t.test('clientResponseHeaders drops hop-by-hop and Connection-listed headers', async t => {
  const out = clientResponseHeaders({
    connection: 'close, X-Internal-Trace',
    'keep-alive': 'timeout=5',
    'transfer-encoding': 'chunked',
    'proxy-connection': 'close',
    'proxy-authenticate': 'Basic',
    te: 'trailers',
    trailer: 'x-t',
    upgrade: 'h2c',
    'x-internal-trace': 'node-7',
    'content-type': 'application/fhir+json',
    'content-length': '10',
    location: '/fhir/Patient/2/_history/1',
    etag: 'W/"1"',
    'set-cookie': ['a=1', 'b=2']
  }, REWRITE, NOT_OURS)
  t.same(out, {
    'content-type': 'application/fhir+json',
    'content-length': '10',
    location: '/fhir/Patient/2/_history/1',
    etag: 'W/"1"'
    // upstream cookies mean nothing for the gateway's origin: dropped
  })
})

t.test('clientResponseHeaders without a Connection header keeps end-to-end headers', async t => {
  t.same(clientResponseHeaders({ 'content-type': 'text/plain', 'last-modified': 'x' }, REWRITE, NOT_OURS), { 'content-type': 'text/plain', 'last-modified': 'x' })
})

t.test('Location and Content-Location into the upstream are rewritten to the proxy prefix', async t => {
  const cases: Array<[string, string]> = [
    ['http://ehr.internal:8080/base/Patient/3/_history/1', '/fhir/Patient/3/_history/1'],
    ['http://ehr.internal:8080/base', '/fhir'],
    ['/base/Patient/3', '/fhir/Patient/3'],
    ['http://ehr.internal:8080/basement/x', 'http://ehr.internal:8080/basement/x'],
    ['https://elsewhere.example/base/x', 'https://elsewhere.example/base/x'],
    ['Patient/3', 'Patient/3']
  ]
  for (const [location, expected] of cases) {
    t.same(clientResponseHeaders({ location, 'content-location': location }, REWRITE, NOT_OURS), { location: expected, 'content-location': expected }, location)
  }
})

t.test('headers the gateway set itself are not replaced by the upstream', async t => {
  const ours = new Set(['strict-transport-security', 'x-frame-options'])
  t.same(clientResponseHeaders({ 'strict-transport-security': 'max-age=0', 'x-frame-options': 'ALLOWALL', etag: '1' }, REWRITE, n => ours.has(n)), { etag: '1' })
})

t.test('translateUpstreamError maps undici and socket failures to our codes', async t => {
  const withCode = (code: string): Error => Object.assign(new Error(`boom ${code} 10.0.0.7:8080`), { code })
  const cases: Array<[string, unknown, boolean, string, number]> = [
    ['headers timeout', new undiciErrors.HeadersTimeoutError(), false, 'UPSTREAM_TIMEOUT', 504],
    ['body timeout', new undiciErrors.BodyTimeoutError(), true, 'UPSTREAM_TIMEOUT', 504],
    ['connect timeout', new undiciErrors.ConnectTimeoutError(), false, 'UPSTREAM_TIMEOUT', 504],
    ['ETIMEDOUT', withCode('ETIMEDOUT'), false, 'UPSTREAM_TIMEOUT', 504],
    ['ECONNREFUSED', withCode('ECONNREFUSED'), false, 'UPSTREAM_UNAVAILABLE', 502],
    ['ENOTFOUND', withCode('ENOTFOUND'), false, 'UPSTREAM_UNAVAILABLE', 502],
    ['ECONNREFUSED after a response', withCode('ECONNREFUSED'), true, 'UPSTREAM_ERROR', 502],
    ['socket closed', new undiciErrors.SocketError('other side closed'), false, 'UPSTREAM_ERROR', 502],
    ['unknown', new Error('something else'), false, 'UPSTREAM_ERROR', 502],
    ['not an error', 'a string', false, 'UPSTREAM_ERROR', 502]
  ]
  for (const [name, err, responded, code, status] of cases) {
    const translated = translateUpstreamError(err, responded)
    t.ok(translated instanceof GatewayError, name)
    t.equal(translated.code, code, name)
    t.equal(translated.statusCode, status, name)
    t.equal(translated.cause, err, `${name}: cause kept for the log`)
    t.notMatch(translated.message, /10\.0\.0\.7|8080/, `${name}: no internal address in the message`)
  }
})

t.test('translateUpstreamError passes our own errors through', async t => {
  const own = new GatewayError('BODY_TOO_LARGE', [1024])
  t.equal(translateUpstreamError(own, false), own)
  t.equal(translateUpstreamError(new Error('wrapped', { cause: own }), false), own)
})

t.test('limitBody streams up to the limit and refuses past it', async t => {
  const collect = async (chunks: Buffer[], limit: number): Promise<Buffer> => {
    const out: Buffer[] = []
    for await (const chunk of limitBody(Readable.from(chunks), limit)) out.push(chunk)
    return Buffer.concat(out)
  }
  const a = Buffer.alloc(600, 1)
  const b = Buffer.alloc(424, 2)
  t.same(await collect([a, b], 1024), Buffer.concat([a, b]), 'exactly at the limit')
  await t.rejects(collect([a, b, Buffer.alloc(1)], 1024), { code: 'BODY_TOO_LARGE', statusCode: 413 })
  await t.rejects(collect([Buffer.alloc(2048)], 1024), { code: 'BODY_TOO_LARGE' })
})

t.test('withoutQueryValues keeps parameter names only', async t => {
  const cases: Array<[string, string]> = [
    ['/fhir/Patient', '/fhir/Patient'],
    ['/fhir/Patient?name=SecretSmith', '/fhir/Patient?name='],
    ['/fhir/Patient?name=SecretSmith&birthdate=1970-01-01', '/fhir/Patient?name=&birthdate='],
    ['/fhir/Patient?name=a=b', '/fhir/Patient?name='],
    ['/fhir/Patient?', '/fhir/Patient'],
    ['/fhir/Patient?&&', '/fhir/Patient'],
    ['/fhir/Patient?=SecretSmith', '/fhir/Patient'],
    ['/fhir/Patient?_summary', '/fhir/Patient?_summary='],
    ['/fhir/Observation?code:text=SecretSmith&_count=5', '/fhir/Observation?code:text=&_count=']
  ]
  for (const [url, expected] of cases) t.equal(withoutQueryValues(url), expected, url)
})
