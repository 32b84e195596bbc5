import t from 'tap'
import { createPrivateKey, X509Certificate } from 'node:crypto'
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises'
import { createServer } from 'node:https'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { TLSSocket } from 'node:tls'
import { Agent, request } from 'undici'
// pki.js must load before @peculiar/x509: it installs reflect-metadata and the crypto provider.
import { createDevCa, writeKeyPair } from '../../gateway/demo/pki.js'
import type { KeyPair } from '../../gateway/demo/pki.js'
import * as x509 from '@peculiar/x509'

const SERVER_AUTH = '1.3.6.1.5.5.7.3.1'
const CLIENT_AUTH = '1.3.6.1.5.5.7.3.2'
const DAY_MS = 24 * 60 * 60 * 1000

const ca = await createDevCa()
const otherCa = await createDevCa({ commonName: 'some other CA' })
const server = await ca.issueServer({ commonName: 'gateway.test' })
const client = await ca.issueClient({ commonName: 'workstation-01' })
const strangerClient = await otherCa.issueClient({ commonName: 'workstation-01' })
const expiredClient = await ca.issueClient({
  commonName: 'workstation-expired',
  notBefore: new Date(Date.now() - 2 * DAY_MS),
  notAfter: new Date(Date.now() - DAY_MS)
})

const caX509 = new X509Certificate(ca.cert)

// `enforce: false` lets the handshake finish so the test can read why Node's
// verifier judged a client cert, instead of only seeing a dropped socket.
async function startMtlsServer (enforce = true): Promise<string> {
  const https = createServer({
    key: server.key,
    cert: server.cert,
    ca: ca.cert,
    requestCert: true,
    rejectUnauthorized: enforce
  }, (req, res) => {
    const socket = req.socket as TLSSocket
    const peer = socket.getPeerCertificate()
    res.setHeader('content-type', 'application/json')
    res.end(JSON.stringify({
      cn: peer.subject?.CN ?? null,
      authorized: socket.authorized,
      reason: socket.authorized ? null : String(socket.authorizationError)
    }))
  })
  await new Promise<void>((resolve) => https.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => {
    await new Promise<void>((resolve) => {
      https.close(() => resolve())
      https.closeAllConnections()
    })
  })
  return `https://127.0.0.1:${(https.address() as AddressInfo).port}/`
}

function agentWith (pair?: KeyPair): Agent {
  const agent = new Agent({ connect: { ca: ca.cert, ...(pair === undefined ? {} : { cert: pair.cert, key: pair.key }) } })
  t.teardown(() => agent.close())
  return agent
}

t.test('mutual TLS handshake with certificates from the dev CA', async (t) => {
  const url = await startMtlsServer()

  t.test('a client cert from the CA is accepted and seen by the server', async (t) => {
    const res = await request(url, { dispatcher: agentWith(client) })
    t.equal(res.statusCode, 200)
    t.same(await res.body.json(), { cn: 'workstation-01', authorized: true, reason: null })
  })

  t.test('a client cert from a different CA is refused', async (t) => {
    await t.rejects(request(url, { dispatcher: agentWith(strangerClient) }).then((res) => res.body.dump()))
  })

  t.test('an expired client cert is refused', async (t) => {
    await t.rejects(request(url, { dispatcher: agentWith(expiredClient) }).then((res) => res.body.dump()))
  })

  t.test('no client cert at all is refused', async (t) => {
    await t.rejects(request(url, { dispatcher: agentWith() }).then((res) => res.body.dump()))
  })
})

// Node drops a rejected TLS client without a useful error on either side, so
// prove the refusals above are about the certificates and not something else.
t.test('the verifier rejects each bad client cert for the expected reason', async (t) => {
  const url = await startMtlsServer(false)
  const expired = await request(url, { dispatcher: agentWith(expiredClient) })
  t.same(await expired.body.json(), { cn: 'workstation-expired', authorized: false, reason: 'CERT_HAS_EXPIRED' })
  const stranger = await request(url, { dispatcher: agentWith(strangerClient) })
  t.match(await stranger.body.json(), { cn: 'workstation-01', authorized: false, reason: /^UNABLE_TO_(VERIFY_LEAF_SIGNATURE|GET_ISSUER_CERT)/ })
})

t.test('a client that trusts another CA refuses the server', async (t) => {
  const url = await startMtlsServer()
  const agent = new Agent({ connect: { ca: otherCa.cert, cert: client.cert, key: client.key } })
  t.teardown(() => agent.close())
  await t.rejects(request(url, { dispatcher: agent }).then((res) => res.body.dump()))
})

t.test('CA certificate', async (t) => {
  t.equal(caX509.ca, true)
  t.equal(caX509.subject, 'CN=ehr-gateway dev CA')
  t.equal(caX509.issuer, caX509.subject, 'self-signed')
  t.ok(caX509.checkIssued(caX509))
  t.ok(caX509.verify(caX509.publicKey))
  t.ok(caX509.checkPrivateKey(createPrivateKey(ca.key)))

  const parsed = new x509.X509Certificate(ca.cert)
  const bc = parsed.getExtension(x509.BasicConstraintsExtension)
  t.equal(bc?.ca, true)
  t.equal(bc?.critical, true)
  const ku = parsed.getExtension(x509.KeyUsagesExtension)
  t.equal(ku?.usages, x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign)
  t.ok(parsed.getExtension(x509.SubjectKeyIdentifierExtension)?.keyId)
})

t.test('issued certificates', async (t) => {
  const caSki = new x509.X509Certificate(ca.cert).getExtension(x509.SubjectKeyIdentifierExtension)?.keyId
  const cases: Array<[string, KeyPair, string]> = [
    ['server', server, SERVER_AUTH],
    ['client', client, CLIENT_AUTH],
    ['expired client', expiredClient, CLIENT_AUTH]
  ]
  for (const [label, pair, eku] of cases) {
    t.test(label, async (t) => {
      const cert = new X509Certificate(pair.cert)
      t.equal(cert.ca, false)
      t.ok(cert.checkIssued(caX509), 'issued by the CA')
      t.ok(cert.verify(caX509.publicKey), 'signed by the CA key')
      t.same(cert.keyUsage, [eku])
      t.match(pair.key, /^-----BEGIN PRIVATE KEY-----\n/, 'PKCS#8 PEM')
      const key = createPrivateKey(pair.key)
      t.equal(key.asymmetricKeyDetails?.namedCurve, 'prime256v1')
      t.ok(cert.checkPrivateKey(key), 'key matches certificate')
      t.ok(parseInt(cert.serialNumber.slice(0, 2), 16) < 0x80, 'positive serial')

      const parsed = new x509.X509Certificate(pair.cert)
      t.equal(parsed.getExtension(x509.AuthorityKeyIdentifierExtension)?.keyId, caSki, 'AKI is the CA SKI')
      t.ok(parsed.getExtension(x509.SubjectKeyIdentifierExtension)?.keyId, 'has SKI')
    })
  }

  t.test('server SANs cover localhost over IPv4 and IPv6', async (t) => {
    const cert = new X509Certificate(server.cert)
    t.equal(cert.checkHost('localhost'), 'localhost')
    t.equal(cert.checkIP('127.0.0.1'), '127.0.0.1')
    t.equal(cert.checkIP('::1'), '::1')
    t.equal(cert.checkHost('example.com'), undefined)
  })

  t.test('custom SANs replace the defaults', async (t) => {
    const custom = new X509Certificate((await ca.issueServer({
      commonName: 'gw',
      dnsNames: ['gateway.internal'],
      ipAddresses: ['10.0.0.5']
    })).cert)
    t.equal(custom.subjectAltName, 'DNS:gateway.internal, IP Address:10.0.0.5')
  })

  t.test('default validity is a minute ago to thirty days ahead', async (t) => {
    const cert = new X509Certificate(client.cert)
    const from = new Date(cert.validFrom).getTime()
    const to = new Date(cert.validTo).getTime()
    const now = Date.now()
    t.ok(from <= now - 55 * 1000 && from >= now - 5 * 60 * 1000, 'notBefore about a minute ago')
    t.ok(Math.abs(to - (now + 30 * DAY_MS)) < 5 * 60 * 1000, 'notAfter about 30 days ahead')
    t.ok(new Date(new X509Certificate(expiredClient.cert).validTo).getTime() < now, 'expired cert is in the past')
  })

  t.test('serial numbers are unique', async (t) => {
    const serials = new Set([ca, otherCa, server, client, strangerClient, expiredClient]
      .map((p) => new X509Certificate(p.cert).serialNumber))
    t.equal(serials.size, 6)
  })
})

t.test('writeKeyPair writes PEM files with a private key mode', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'ehr-gateway-pki-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const target = join(dir, 'nested')

  const { certFile, keyFile } = await writeKeyPair(target, 'gateway', server)
  t.equal(certFile, join(target, 'gateway.crt'))
  t.equal(keyFile, join(target, 'gateway.key'))
  t.equal(await readFile(certFile, 'utf8'), server.cert)
  t.equal(await readFile(keyFile, 'utf8'), server.key)
  t.equal((await stat(keyFile)).mode & 0o777, 0o600)

  // Overwriting must replace the key, not fail on the exclusive create.
  await writeKeyPair(target, 'gateway', client)
  t.equal(await readFile(keyFile, 'utf8'), client.key)
  t.equal((await stat(keyFile)).mode & 0o777, 0o600)
})
