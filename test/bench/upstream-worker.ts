// The stand-in EHR in a worker thread, kept for in-process harnesses (test/perf imports it);
// `npm run bench` runs upstream.ts as its own process instead. A fixed ~1.5 KB FHIR Patient
// over keep-alive HTTP.
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { parentPort } from 'node:worker_threads'

const patient = Buffer.from(JSON.stringify({
  resourceType: 'Patient',
  id: 'bench-0001',
  meta: { versionId: '1', lastUpdated: '2026-01-01T00:00:00Z' },
  identifier: [{ system: 'urn:example:mrn', value: 'FAKE-MRN-0001' }],
  name: [{ use: 'official', family: 'Benchmark', given: ['Synthetic', 'Patient'] }],
  gender: 'unknown',
  birthDate: '1970-01-01',
  address: [{ line: ['1 Example Street'], city: 'Exampleton', postalCode: '00000', country: 'XX' }],
  telecom: [{ system: 'phone', value: '+00 000 000 000', use: 'home' }],
  note: [{ text: 'x'.repeat(1000) }]
}))

const server = createServer((req, res) => {
  req.resume()
  req.on('end', () => {
    res.writeHead(200, { 'content-type': 'application/fhir+json', 'content-length': patient.length })
    res.end(patient)
  })
})
server.keepAliveTimeout = 60_000
server.listen(0, '127.0.0.1', () => {
  parentPort?.postMessage({ port: (server.address() as AddressInfo).port, bytes: patient.length })
})
parentPort?.on('message', () => { server.closeAllConnections(); server.close() })
