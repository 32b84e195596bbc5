// The ehr-gateway browser client: a dependency-free ES module (no imports at all, so a page
// can load dist/gateway/browser/ehr-client.js as is). It keeps a non-extractable ES256 key,
// fetches DPoP-bound tokens (RFC 9449 §5) and refreshes them before they expire, signs a
// fresh proof for every request (§4.2) and answers a nonce challenge (§8, §9) once.
//
//   const ehr = createEhrClient({ gatewayUrl: 'https://ehr-gateway.hospital.internal:8443' })
//   const patient = await (await ehr.fetch('/fhir/Patient/123')).json()

export interface EhrClientOptions {
  // The gateway's public URL, as the page reaches it (no trailing path needed).
  readonly gatewayUrl: string
  // Defaults to globalThis.fetch; tests pass one that presents the client certificate.
  readonly fetch?: typeof fetch
  // Seconds before expiry at which a token is replaced (default 30, at most half its life).
  readonly refreshBeforeSeconds?: number
  // Milliseconds since the epoch (default Date.now); proofs' iat is taken from it.
  readonly now?: () => number
}

export interface EhrClient {
  // fetch() against the gateway: `path` is resolved against gatewayUrl.
  fetch(path: string, init?: RequestInit): Promise<Response>
  // The current access token, fetched or refreshed as needed.
  token(): Promise<string>
  // Forget the key and the token; later calls fail.
  close(): void
}

interface Token { readonly value: string, readonly refreshAt: number }
// Spelled through `crypto` so the module compiles against DOM and Node typings alike.
type WebCryptoKey = Parameters<typeof crypto.subtle.sign>[1]

const encoder = new TextEncoder()

function base64url (bytes: Uint8Array): string {
  let binary = ''
  for (const b of bytes) binary += String.fromCharCode(b)
  return btoa(binary).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '')
}

const base64urlJson = (value: unknown): string => base64url(encoder.encode(JSON.stringify(value)))

function randomId (): string {
  return base64url(crypto.getRandomValues(new Uint8Array(16)))
}

// RFC 9449 §7.1 / §9: `WWW-Authenticate: DPoP error="use_dpop_nonce"`.
function asksForNonce (response: Response): boolean {
  return /\bDPoP\b[^]*error="use_dpop_nonce"/i.test(response.headers.get('www-authenticate') ?? '')
}

export function createEhrClient (options: EhrClientOptions): EhrClient {
  const base = new URL(options.gatewayUrl)
  const doFetch = options.fetch ?? globalThis.fetch.bind(globalThis)
  const now = options.now ?? Date.now
  const refreshBefore = options.refreshBeforeSeconds ?? 30
  const tokenUrl = new URL('/v1/token', base).href
  let closed = false
  let nonce: string | undefined
  let current: Token | undefined
  let pending: Promise<Token> | undefined

  // Non-extractable: script on the page can sign with the key but never read it out.
  const keys: Promise<{ privateKey: WebCryptoKey, jwk: Record<string, string> }> = (async () => {
    const pair = await crypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign']) as { publicKey: WebCryptoKey, privateKey: WebCryptoKey }
    const { kty, crv, x, y } = await crypto.subtle.exportKey('jwk', pair.publicKey)
    return { privateKey: pair.privateKey, jwk: { kty: kty ?? 'EC', crv: crv ?? 'P-256', x: x ?? '', y: y ?? '' } }
  })()
  // A failure surfaces on first use, not as an unhandled rejection.
  keys.catch(() => {})

  async function proof (method: string, url: URL, accessToken?: string): Promise<string> {
    const { privateKey, jwk } = await keys
    const payload: Record<string, string | number> = {
      jti: randomId(),
      htm: method,
      // §4.2: the target URI without query and fragment.
      htu: url.origin + url.pathname,
      iat: Math.floor(now() / 1000)
    }
    if (accessToken !== undefined) {
      payload['ath'] = base64url(new Uint8Array(await crypto.subtle.digest('SHA-256', encoder.encode(accessToken))))
    }
    if (nonce !== undefined) payload['nonce'] = nonce
    const input = `${base64urlJson({ typ: 'dpop+jwt', alg: 'ES256', jwk })}.${base64urlJson(payload)}`
    // WebCrypto's ECDSA signature is already the r||s form JWS wants (RFC 7518 §3.4).
    const signature = await crypto.subtle.sign({ name: 'ECDSA', hash: 'SHA-256' }, privateKey, encoder.encode(input))
    return `${input}.${base64url(new Uint8Array(signature))}`
  }

  function remember (response: Response): void {
    const offered = response.headers.get('dpop-nonce')
    if (offered !== null && offered !== '') nonce = offered
  }

  async function requestToken (): Promise<Token> {
    for (let attempt = 0; ; attempt++) {
      const response = await doFetch(tokenUrl, {
        method: 'POST',
        credentials: 'include',
        headers: { dpop: await proof('POST', new URL(tokenUrl)) }
      })
      remember(response)
      const body = await response.json().catch(() => ({})) as Record<string, unknown>
      // RFC 9449 §8: the token endpoint asks for a nonce with 400 use_dpop_nonce.
      if (response.status === 400 && body['error'] === 'use_dpop_nonce' && attempt === 0) continue
      if (!response.ok || typeof body['access_token'] !== 'string' || body['token_type'] !== 'DPoP') {
        throw new Error(`ehr-gateway token request failed: ${response.status} ${String(body['code'] ?? body['error'] ?? '')}`)
      }
      const lifetime = typeof body['expires_in'] === 'number' ? body['expires_in'] : 60
      const margin = Math.min(refreshBefore, lifetime / 2)
      return { value: body['access_token'], refreshAt: now() + (lifetime - margin) * 1000 }
    }
  }

  // Single flight: concurrent callers share one token request.
  async function token (): Promise<string> {
    if (closed) throw new Error('ehr-gateway client is closed')
    if (current !== undefined && now() < current.refreshAt) return current.value
    pending ??= requestToken().then(t => { current = t; return t }).finally(() => { pending = undefined })
    return (await pending).value
  }

  async function send (path: string, init: RequestInit = {}): Promise<Response> {
    const url = new URL(path, base)
    const method = (init.method ?? 'GET').toUpperCase()
    // A stream can be sent once: no retry then.
    const once = typeof ReadableStream !== 'undefined' && init.body instanceof ReadableStream
    for (let attempt = 0; ; attempt++) {
      const accessToken = await token()
      const headers = new Headers(init.headers)
      headers.set('authorization', `DPoP ${accessToken}`)
      headers.set('dpop', await proof(method, url, accessToken))
      const response = await doFetch(url.href, { credentials: 'include', ...init, method, headers })
      remember(response)
      if (response.status !== 401 || attempt > 0 || once) return response
      if (asksForNonce(response)) continue
      // An expired or refused token: one retry with a fresh one.
      if (/error="invalid_token"/.test(response.headers.get('www-authenticate') ?? '')) {
        current = undefined
        continue
      }
      return response
    }
  }

  return {
    fetch: send,
    token,
    close () {
      closed = true
      current = undefined
      nonce = undefined
    }
  }
}
