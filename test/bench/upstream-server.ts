// The stand-in EHR of the benchmarks: a fixed ~1.5 KB FHIR Patient over keep-alive HTTP.
// upstream.ts runs it as its own process (npm run bench), upstream-worker.ts in a worker
// thread (the in-process harnesses under test/perf).
import { createServer } from 'node:http'
import type { Server } from 'node:http'
import type { AddressInfo } from 'node:net'

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

export function listenUpstream (onListening: (info: { port: number, bytes: number }) => void): Server {
  const server = createServer((req, res) => {
    req.resume()
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'application/fhir+json', 'content-length': patient.length })
      res.end(patient)
    })
  })
  server.keepAliveTimeout = 60_000
  server.listen(0, '127.0.0.1', () => { onListening({ port: (server.address() as AddressInfo).port, bytes: patient.length }) })
  return server
}
