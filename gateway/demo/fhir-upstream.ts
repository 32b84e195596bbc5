import { createHash, randomUUID, timingSafeEqual } from 'node:crypto'
import { createServer } from 'node:http'
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'

// Stand-in for the real EHR so `npm run demo` works offline. Every record is
// synthetic and deliberately absurd so it can never be mistaken for PHI.

export interface HumanName { use?: string; family?: string; given?: string[] }
export interface Identifier { system: string; value: string }
export interface Patient {
  resourceType: 'Patient'
  id: string
  meta?: { versionId: string; lastUpdated: string }
  identifier?: Identifier[]
  name?: HumanName[]
  gender?: 'male' | 'female' | 'other' | 'unknown'
  birthDate?: string
  [key: string]: unknown
}

export interface FhirUpstreamOptions {
  host?: string
  port?: number
  basePath?: string
  // When set, every request must carry this value in `x-api-key`; the demo
  // uses it to show the gateway injects the secret the workstation never sees.
  apiKey?: string
}

export interface FhirUpstream {
  url: string
  // Live view of the store: includes resources created through POST.
  patients: readonly Patient[]
  close(): Promise<void>
}

const MRN_SYSTEM = 'urn:example:mrn'
const CONTENT_TYPE = 'application/fhir+json; charset=utf-8'
// Generous for a demo, but bounded so a runaway client cannot exhaust memory.
const MAX_BODY_BYTES = 1024 * 1024

function seedPatients (): Patient[] {
  const seeds: Array<[string, string, Patient['gender'], string]> = [
    ['Testpatient', 'Alpha', 'female', '1970-01-01'],
    ['Testpatient', 'Bravo', 'male', '1980-02-02'],
    ['Fakerson', 'Charlie', 'other', '1990-03-03'],
    ['Synthetica', 'Delta', 'unknown', '2000-04-04'],
    ['Placeholder', 'Echo', 'female', '2010-05-05']
  ]
  const lastUpdated = new Date(0).toISOString()
  return seeds.map(([family, given, gender, birthDate], i) => {
    const n = String(i + 1).padStart(4, '0')
    return {
      resourceType: 'Patient',
      id: `example-${n}`,
      meta: { versionId: '1', lastUpdated },
      identifier: [{ system: MRN_SYSTEM, value: `FAKE-MRN-${n}` }],
      name: [{ use: 'official', family, given: [given] }],
      gender,
      birthDate
    }
  })
}

function operationOutcome (code: string, diagnostics: string): object {
  return {
    resourceType: 'OperationOutcome',
    issue: [{ severity: 'error', code, diagnostics }]
  }
}

function send (res: ServerResponse, status: number, body: object, headers: Record<string, string> = {}): void {
  const payload = Buffer.from(JSON.stringify(body))
  res.writeHead(status, {
    'content-type': CONTENT_TYPE,
    // An explicit length (never chunked) keeps the connection reusable.
    'content-length': String(payload.length),
    ...headers
  })
  res.end(payload)
}

// Resolves to null once the limit is passed; the rest of the body is still
// drained (and discarded) so the 413 can actually reach the client.
async function readBody (req: IncomingMessage): Promise<Buffer | null> {
  return await new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let size = 0
    req.on('data', (chunk: Buffer) => {
      size += chunk.length
      if (size > MAX_BODY_BYTES) {
        chunks.length = 0
        resolve(null)
        return
      }
      chunks.push(chunk)
    })
    req.once('end', () => { resolve(size > MAX_BODY_BYTES ? null : Buffer.concat(chunks)) })
    req.once('error', reject)
  })
}

function digest (value: string): Buffer {
  return createHash('sha256').update(value).digest()
}

function matchesName (patient: Patient, needle: string): boolean {
  const lower = needle.toLowerCase()
  return (patient.name ?? []).some((n) =>
    [n.family ?? '', ...(n.given ?? [])].some((part) => part.toLowerCase().includes(lower)))
}

function formatOrigin (address: AddressInfo): string {
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address
  return `http://${host}:${address.port}`
}

export async function startFhirUpstream (opts: FhirUpstreamOptions = {}): Promise<FhirUpstream> {
  const host = opts.host ?? '127.0.0.1'
  const basePath = (opts.basePath ?? '/fhir').replace(/\/+$/, '')
  // Hashing both sides gives equal-length buffers, which timingSafeEqual needs.
  const expectedKey = opts.apiKey === undefined ? undefined : digest(opts.apiKey)
  const patients = seedPatients()
  let baseUrl = ''

  function authorized (req: IncomingMessage): boolean {
    if (expectedKey === undefined) return true
    const presented = req.headers['x-api-key']
    if (typeof presented !== 'string') return false
    return timingSafeEqual(digest(presented), expectedKey)
  }

  function route (req: IncomingMessage, res: ServerResponse, body: Buffer): void {
    const url = new URL(req.url ?? '/', 'http://upstream.invalid')
    const path = url.pathname
    if (path !== basePath && !path.startsWith(`${basePath}/`)) {
      send(res, 404, operationOutcome('not-found', `No route for ${path}`))
      return
    }
    const segments = path.slice(basePath.length).split('/').filter((s) => s !== '')
    const method = req.method ?? 'GET'

    if (method === 'GET' && segments.length === 1 && segments[0] === 'metadata') {
      send(res, 200, {
        resourceType: 'CapabilityStatement',
        status: 'active',
        date: new Date().toISOString(),
        kind: 'instance',
        software: { name: 'ehr-gateway demo FHIR upstream' },
        fhirVersion: '4.0.1',
        format: ['application/fhir+json'],
        rest: [{
          mode: 'server',
          resource: [{
            type: 'Patient',
            interaction: [{ code: 'read' }, { code: 'search-type' }, { code: 'create' }],
            searchParam: [{ name: 'name', type: 'string' }]
          }]
        }]
      })
      return
    }

    if (segments[0] === 'Patient' && segments.length === 2 && method === 'GET') {
      const patient = patients.find((p) => p.id === segments[1])
      if (patient === undefined) {
        send(res, 404, operationOutcome('not-found', `Patient/${segments[1]} is not known`))
      } else {
        send(res, 200, patient, { etag: `W/"${patient.meta?.versionId ?? '1'}"` })
      }
      return
    }

    if (segments[0] === 'Patient' && segments.length === 1 && method === 'GET') {
      const names = url.searchParams.getAll('name')
      const matches = patients.filter((p) => names.every((n) => matchesName(p, n)))
      send(res, 200, {
        resourceType: 'Bundle',
        type: 'searchset',
        total: matches.length,
        link: [{ relation: 'self', url: `${baseUrl}/Patient${url.search}` }],
        entry: matches.map((p) => ({
          fullUrl: `${baseUrl}/Patient/${p.id}`,
          resource: p,
          search: { mode: 'match' }
        }))
      })
      return
    }

    if (segments[0] === 'Patient' && segments.length === 1 && method === 'POST') {
      let parsed: unknown
      try {
        parsed = JSON.parse(body.toString('utf8'))
      } catch {
        send(res, 400, operationOutcome('structure', 'Request body is not valid JSON'))
        return
      }
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed) ||
        (parsed as { resourceType?: unknown }).resourceType !== 'Patient') {
        send(res, 400, operationOutcome('invalid', 'Expected a Patient resource'))
        return
      }
      // FHIR create ignores any client-supplied id: the server owns identity.
      const created: Patient = {
        ...(parsed as Patient),
        id: randomUUID(),
        meta: { versionId: '1', lastUpdated: new Date().toISOString() }
      }
      patients.push(created)
      send(res, 201, created, {
        location: `${baseUrl}/Patient/${created.id}/_history/1`,
        etag: 'W/"1"'
      })
      return
    }

    send(res, 404, operationOutcome('not-found', `No route for ${method} ${path}`))
  }

  const server = createServer((req, res) => {
    // Drain the body before answering, even on errors, so the client can
    // reuse the connection instead of the server having to close it.
    readBody(req).then((body) => {
      if (body === null) {
        // Close afterwards: there is no point keeping a socket that is still
        // streaming an oversized body.
        send(res, 413, operationOutcome('too-costly', `Body exceeds ${MAX_BODY_BYTES} bytes`), { connection: 'close' })
        return
      }
      if (!authorized(req)) {
        send(res, 401, operationOutcome('security', 'Missing or invalid x-api-key'))
        return
      }
      route(req, res, body)
    }).catch(() => {
      if (!res.headersSent) send(res, 500, operationOutcome('exception', 'Internal error'))
      else res.destroy()
    })
  })

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(opts.port ?? 0, host, () => {
      server.off('error', reject)
      resolve()
    })
  })
  baseUrl = formatOrigin(server.address() as AddressInfo) + basePath

  return {
    url: baseUrl,
    patients,
    async close () {
      await new Promise<void>((resolve, reject) => {
        server.close((err) => { if (err) reject(err); else resolve() })
        // Kept-alive sockets would otherwise hold close() open until they time out.
        server.closeAllConnections()
      })
    }
  }
}
