import { createServer } from 'node:http'
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'

// A real HTTP server standing in for the EHR so integration tests exercise
// the gateway's actual sockets, headers and bodies rather than a mock.

export interface RecordedRequest { method: string; url: string; headers: IncomingHttpHeaders; rawHeaders: string[]; body: Buffer }
export type UpstreamHandler = (req: RecordedRequest, res: ServerResponse) => void | Promise<void>
export interface RecordingUpstream { url: string; origin: string; requests: RecordedRequest[]; setHandler(h: UpstreamHandler): void; close(): Promise<void> }

const defaultHandler: UpstreamHandler = (req, res) => {
  const payload = Buffer.from(JSON.stringify({ resourceType: 'Patient', id: 'echo', method: req.method, url: req.url }))
  res.writeHead(200, {
    'content-type': 'application/fhir+json',
    'content-length': String(payload.length)
  })
  res.end(payload)
}

async function readBody (req: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const chunk of req) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks)
}

export async function startRecordingUpstream (opts: { basePath?: string; handler?: UpstreamHandler } = {}): Promise<RecordingUpstream> {
  const basePath = opts.basePath ?? '/fhir'
  const requests: RecordedRequest[] = []
  let handler = opts.handler ?? defaultHandler

  const server = createServer((req, res) => {
    readBody(req)
      .then(async (body) => {
        const recorded: RecordedRequest = {
          method: req.method ?? '',
          url: req.url ?? '',
          headers: req.headers,
          rawHeaders: req.rawHeaders,
          body
        }
        // Recorded before the handler runs so a handler that throws or
        // hangs still leaves evidence of what the gateway sent.
        requests.push(recorded)
        await handler(recorded, res)
      })
      .catch((err: unknown) => {
        // Surface handler bugs as a 500 with the message rather than a hung
        // request, which would only show up as a confusing test timeout.
        if (!res.headersSent) {
          const message = err instanceof Error ? err.message : String(err)
          res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' })
          res.end(`recording upstream handler failed: ${message}`)
        } else {
          res.destroy()
        }
      })
  })

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject)
      resolve()
    })
  })
  const { port } = server.address() as AddressInfo
  const origin = `http://127.0.0.1:${port}`

  return {
    url: origin + basePath,
    origin,
    requests,
    setHandler (h: UpstreamHandler) { handler = h },
    async close () {
      await new Promise<void>((resolve, reject) => {
        server.close((err) => { if (err) reject(err); else resolve() })
        // Without this, the gateway's pooled keep-alive sockets keep close()
        // (and so the whole test file) waiting for their idle timeout.
        server.closeAllConnections()
      })
    }
  }
}
