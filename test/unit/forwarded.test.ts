import t from 'tap'
import { certificateFromXfcc, parseXfcc, trustedPeers } from '../../gateway/forwarded.js'

const entries = (value: string): Array<Record<string, string[]>> => parseXfcc(value).map(m => Object.fromEntries(m))

t.test('XFCC as Envoy documents it', async t => {
  // the three examples of Envoy's x-forwarded-client-cert documentation
  t.same(entries('By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com'), [{
    by: ['http://frontend.lyft.com'],
    hash: ['468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688'],
    subject: ['/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client'],
    uri: ['http://testclient.lyft.com']
  }])
  const two = entries('By=http://frontend.lyft.com;Hash=468e;URI=http://testclient.lyft.com,By=http://backend.lyft.com;Hash=9ba6;URI=http://frontend.lyft.com')
  t.equal(two.length, 2)
  t.same(two[1]?.['by'], ['http://backend.lyft.com'])
  t.same(entries('Hash=46;URI=http://testclient.lyft.com;DNS=lyft.com;DNS=www.lyft.com')[0]?.['dns'], ['lyft.com', 'www.lyft.com'])
})

t.test('quoted values may hold , ; = and escaped quotes; keys are case-insensitive', async t => {
  const [e] = entries('HASH=ab;subject="CN=a,O=b; c=d \\"q\\"";Cert="x%3Dy"')
  t.same(e, { hash: ['ab'], subject: ['CN=a,O=b; c=d "q"'], cert: ['x%3Dy'] })
  t.same(entries('Hash=a; Cert="c" , Hash=b;Cert="d";').map(x => x['hash']), [['a'], ['b']], 'spaces after a Node-joined duplicate header, trailing ;')
})

t.test('malformed XFCC is refused, never guessed at', async t => {
  for (const bad of ['', 'garbage', 'Hash', '=x', 'Cert="unclosed', 'Cert="a"b', 'Hash=a,,Hash=b', 'Hash=a,', ',Hash=a', 'Ha-sh=a', ';']) {
    t.throws(() => parseXfcc(bad), `${JSON.stringify(bad)} refused`)
  }
})

t.test('the certificate is the last element\'s', async t => {
  t.same(certificateFromXfcc('Cert="first",Hash=ab;Cert="-----BEGIN%20CERTIFICATE-----"'), { pem: '-----BEGIN CERTIFICATE-----', hash: 'ab' })
  t.throws(() => certificateFromXfcc('Cert="a",Hash=ab'), /no Cert/)
  t.throws(() => certificateFromXfcc('Cert="a";Cert="b"'), /several Cert/)
  t.throws(() => certificateFromXfcc('Cert="a";Hash=1;Hash=2'), /several Hash/)
  t.throws(() => certificateFromXfcc('Cert="%E0%A4%A"'), URIError)
})

t.test('TRUSTED_PROXIES matching', async t => {
  const trusted = trustedPeers(['10.0.0.0/8', '192.168.1.7', 'fd00::/8'])
  const cases: Array<[string | undefined, boolean]> = [
    ['10.1.2.3', true], ['::ffff:10.1.2.3', true], ['11.0.0.1', false], ['192.168.1.7', true],
    ['192.168.1.8', false], ['fd12::1', true], ['fe80::1', false], [undefined, false], ['not-an-ip', false]
  ]
  for (const [address, expected] of cases) t.equal(trusted(address), expected, String(address))
  t.equal(trustedPeers([])('127.0.0.1'), false, 'none by default')
})
