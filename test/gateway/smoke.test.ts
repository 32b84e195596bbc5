import t from 'tap'
import { startGateway } from '../helpers/gateway.js'

t.test('token then proxied read', async t => {
  const gw = await startGateway(t)
  const { pair } = await gw.register('ws-01')
  const agent = gw.agent(pair)
  const token = await gw.fetchToken(agent)
  const res = await gw.call(agent, '/fhir/Patient/1?name=x', { headers: { authorization: `Bearer ${token}` } })
  t.equal(res.status, 200, res.text)
  t.equal(gw.upstream.requests[0]?.url, '/fhir/Patient/1?name=x')
  t.equal(gw.upstream.requests[0]?.headers['x-api-key'], gw.config.upstream.apiKey?.reveal())
  t.equal(gw.upstream.requests[0]?.headers.authorization, undefined)
  const none = await gw.call(gw.agent(), '/fhir/Patient/1')
  t.equal(none.status, 401, none.text)
  t.equal(none.json()['code'], 'CLIENT_CERT_REQUIRED')
})
