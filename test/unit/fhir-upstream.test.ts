import t from 'tap'
import { request } from 'undici'
import { startFhirUpstream } from '../../gateway/demo/fhir-upstream.js'

const API_KEY = 'demo-upstream-key'
const FHIR_JSON = 'application/fhir+json; charset=utf-8'

const upstream = await startFhirUpstream({ apiKey: API_KEY })
t.teardown(() => upstream.close())
const headers = { 'x-api-key': API_KEY }

interface Resource { resourceType: string; id?: string; [key: string]: unknown }
interface Bundle extends Resource { type: string; total: number; entry: Array<{ resource: Resource }> }

t.match(upstream.url, /^http:\/\/127\.0\.0\.1:\d+\/fhir$/)
t.equal(upstream.patients.length, 5)

t.test('metadata returns a CapabilityStatement', async (t) => {
  const res = await request(`${upstream.url}/metadata`, { headers })
  t.equal(res.statusCode, 200)
  t.equal(res.headers['content-type'], FHIR_JSON)
  t.match(await res.body.json(), { resourceType: 'CapabilityStatement', fhirVersion: '4.0.1' })
})

t.test('read a patient', async (t) => {
  const patient = upstream.patients[0]!
  const res = await request(`${upstream.url}/Patient/${patient.id}`, { headers })
  t.equal(res.statusCode, 200)
  t.equal(res.headers['content-type'], FHIR_JSON)
  const body = await res.body.json() as Resource
  t.same(body, patient)
  t.match(body, { identifier: [{ system: 'urn:example:mrn' }] })
})

t.test('unknown patient is a 404 OperationOutcome', async (t) => {
  const res = await request(`${upstream.url}/Patient/does-not-exist`, { headers })
  t.equal(res.statusCode, 404)
  t.match(await res.body.json(), { resourceType: 'OperationOutcome', issue: [{ code: 'not-found' }] })
})

t.test('unknown route is a 404 OperationOutcome', async (t) => {
  const res = await request(`${upstream.url}/Observation`, { headers })
  t.equal(res.statusCode, 404)
  t.match(await res.body.json(), { resourceType: 'OperationOutcome' })
})

t.test('search by name is a case-insensitive substring match', async (t) => {
  const res = await request(`${upstream.url}/Patient?name=TESTPAT`, { headers })
  t.equal(res.statusCode, 200)
  const bundle = await res.body.json() as Bundle
  t.equal(bundle.resourceType, 'Bundle')
  t.equal(bundle.type, 'searchset')
  t.equal(bundle.total, 2)
  t.equal(bundle.entry.length, 2)

  const byGiven = await request(`${upstream.url}/Patient?name=echo`, { headers })
  t.equal((await byGiven.body.json() as Bundle).total, 1)

  const none = await request(`${upstream.url}/Patient?name=nobody-by-this-name`, { headers })
  t.same((await none.body.json() as Bundle).entry, [])
})

t.test('create a patient', async (t) => {
  const res = await request(`${upstream.url}/Patient`, {
    method: 'POST',
    headers: { ...headers, 'content-type': 'application/fhir+json' },
    body: JSON.stringify({ resourceType: 'Patient', id: 'client-chosen', name: [{ family: 'Newperson', given: ['Foxtrot'] }] })
  })
  t.equal(res.statusCode, 201)
  const created = await res.body.json() as Resource
  t.not(created.id, 'client-chosen', 'server assigns the id')
  t.equal(res.headers.location, `${upstream.url}/Patient/${created.id}/_history/1`)

  const read = await request(`${upstream.url}/Patient/${created.id}`, { headers })
  t.equal(read.statusCode, 200)
  t.match(await read.body.json(), { name: [{ family: 'Newperson' }] })

  const bad = await request(`${upstream.url}/Patient`, { method: 'POST', headers, body: '{not json' })
  t.equal(bad.statusCode, 400)
  t.match(await bad.body.json(), { resourceType: 'OperationOutcome' })
})

t.test('requests without the right x-api-key are refused', async (t) => {
  const missing = await request(`${upstream.url}/metadata`)
  t.equal(missing.statusCode, 401)
  t.match(await missing.body.json(), { resourceType: 'OperationOutcome', issue: [{ code: 'security' }] })

  const wrong = await request(`${upstream.url}/Patient/${upstream.patients[0]!.id}`, { headers: { 'x-api-key': 'nope' } })
  t.equal(wrong.statusCode, 401)
  await wrong.body.dump()
})

t.test('without apiKey no key is required', async (t) => {
  const open = await startFhirUpstream({ basePath: '/r4/' })
  t.teardown(() => open.close())
  t.match(open.url, /\/r4$/)
  const res = await request(`${open.url}/metadata`)
  t.equal(res.statusCode, 200)
  await res.body.dump()
})
