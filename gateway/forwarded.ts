import { X509Certificate, createHash } from 'node:crypto'
import { BlockList, isIP } from 'node:net'
import { certificateThumbprint, checkMachineCertificate } from '../shared/certificates.js'
import { GatewayError } from '../shared/errors.js'
import { Lru } from './lru.js'

// Behind a TLS-terminating load balancer the machine certificate arrives in a header:
// Envoy's `X-Forwarded-Client-Cert` or nginx's `X-SSL-Client-Cert` ($ssl_client_escaped_cert).
export const XFCC = 'x-forwarded-client-cert'
export const NGINX_CERT = 'x-ssl-client-cert'
export const CERT_HEADERS = [XFCC, NGINX_CERT] as const

// TRUSTED_PROXIES as a BlockList (Node's CIDR matcher); the config validated every entry.
export function trustedPeers (cidrs: readonly string[]): (address: string | undefined) => boolean {
  if (cidrs.length === 0) return () => false
  const list = new BlockList()
  for (const cidr of cidrs) {
    const [addr = '', bits] = cidr.split('/')
    const type = isIP(addr) === 6 ? 'ipv6' : 'ipv4'
    if (bits === undefined) list.addAddress(addr, type)
    else list.addSubnet(addr, Number(bits), type)
  }
  return address => {
    if (address === undefined) return false
    // A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
    const plain = address.startsWith('::ffff:') && address.includes('.') ? address.slice(7) : address
    const type = isIP(plain)
    return type !== 0 && list.check(plain, type === 6 ? 'ipv6' : 'ipv4')
  }
}

type Pairs = Map<string, string[]>

// Envoy's XFCC grammar (configuration/http/http_conn_man/headers, x-forwarded-client-cert):
// elements separated by `,`, each one `;`-separated `key=value` pairs, keys case-insensitive,
// a value containing `,` `;` or `=` double-quoted with `\"` for a quote inside. Every proxy
// appends its element, so the last one is what the proxy nearest to us saw.
export function parseXfcc (value: string): Pairs[] {
  const elements: Pairs[] = []
  let pairs: Pairs = new Map()
  let key = ''
  let text = ''
  let inKey = true
  let quoted = false
  let wasQuoted = false
  const endPair = (): void => {
    const k = key.trim().toLowerCase()
    const v = wasQuoted ? text : text.trim()
    if (k === '' && v === '' && inKey) return // an empty pair, e.g. a trailing `;`
    if (inKey || k === '' || !/^[a-z]+$/.test(k)) throw new Error('a pair is not key=value')
    pairs.set(k, [...(pairs.get(k) ?? []), v])
    key = ''; text = ''; inKey = true; wasQuoted = false
  }
  for (let i = 0; i < value.length; i++) {
    const c = value[i] as string
    if (quoted) {
      if (c === '\\' && i + 1 < value.length) {
        text += value[++i]
      } else if (c === '"') {
        quoted = false
      } else {
        text += c
      }
    } else if (c === '"' && !inKey && text.trim() === '' && !wasQuoted) {
      quoted = true; wasQuoted = true; text = ''
    } else if (c === '=' && inKey) {
      inKey = false
    } else if (c === ';' || c === ',') {
      endPair()
      if (c === ',') {
        if (pairs.size === 0) throw new Error('an element is empty')
        elements.push(pairs)
        pairs = new Map()
      }
    } else if (wasQuoted) {
      if (c.trim() !== '') throw new Error('text after a quoted value')
    } else if (inKey) {
      key += c
    } else {
      text += c
    }
  }
  if (quoted) throw new Error('a quoted value is not closed')
  endPair()
  if (pairs.size === 0) throw new Error(elements.length === 0 ? 'it is empty' : 'an element is empty')
  elements.push(pairs)
  return elements
}

// The certificate of the last XFCC element, as PEM. `Hash` (hex SHA-256 of the DER), when
// present, must describe the same certificate.
export function certificateFromXfcc (value: string): { pem: string, hash: string | undefined } {
  const last = parseXfcc(value).at(-1) as Pairs
  const certs = last.get('cert') ?? []
  if (certs.length !== 1) {
    throw new Error(certs.length === 0 ? 'the last element has no Cert (set_current_client_cert_details: cert: true)' : 'the last element has several Cert values')
  }
  const hashes = last.get('hash') ?? []
  if (hashes.length > 1) throw new Error('the last element has several Hash values')
  return { pem: decodeURIComponent(certs[0] as string), hash: hashes[0] }
}

type Parsed =
  | { readonly thumbprint: string, readonly notBefore: number, readonly notAfter: number }
  | { readonly error: GatewayError, readonly timeDependent?: boolean }

export type PeerVerdict = { readonly thumbprint: string } | { readonly error: GatewayError }

// Parsing, chain and usage checks cost ~100 µs; a proxy sends the same header value for
// every request of one workstation, so results are kept by header value (bounded, as the
// values come from many clients over one connection). Validity is re-checked per request.
export class ForwardedCertificates {
  readonly #caBundle: () => readonly X509Certificate[]
  #ca: readonly X509Certificate[] | undefined
  readonly #now: () => number
  readonly #cache = new Lru<string, Parsed>(2048)

  // caBundle: the client CAs trusted now; a TLS reload (gateway/tls-reload.ts) hands out a
  // new array, and verdicts reached under the previous one are dropped.
  constructor (caBundle: () => readonly X509Certificate[], now: () => number) {
    this.#caBundle = caBundle
    this.#now = now
  }

  verdict (header: typeof CERT_HEADERS[number], value: string): PeerVerdict {
    const ca = this.#caBundle()
    if (ca !== this.#ca) {
      this.#ca = ca
      this.#cache.clear()
    }
    const key = `${header}\n${value}`
    let parsed = this.#cache.get(key)
    if (parsed === undefined) {
      parsed = this.#parse(header, value)
      // An expired or not-yet-valid certificate may become valid (or stay refused) as
      // time moves; only time-independent verdicts are kept.
      if (!('timeDependent' in parsed)) this.#cache.set(key, parsed)
    }
    if ('error' in parsed) return { error: parsed.error }
    const now = this.#now()
    if (now >= parsed.notAfter) return { error: new GatewayError('CLIENT_CERT_UNTRUSTED', ['the forwarded certificate has expired']) }
    if (now < parsed.notBefore) return { error: new GatewayError('CLIENT_CERT_UNTRUSTED', ['the forwarded certificate is not yet valid']) }
    return parsed
  }

  #parse (header: typeof CERT_HEADERS[number], value: string): Parsed {
    let pem: string
    let hash: string | undefined
    try {
      ({ pem, hash } = header === XFCC ? certificateFromXfcc(value) : { pem: decodeURIComponent(value), hash: undefined })
    } catch (err) {
      return { error: new GatewayError('FORWARDED_HEADER_INVALID', [header, err instanceof URIError ? 'invalid URL encoding' : (err as Error).message], { cause: err }) }
    }
    let x509: X509Certificate
    try {
      x509 = checkMachineCertificate(pem, header, this.#ca ?? [], new Date(this.#now())).x509
    } catch (err) {
      const code = (err as GatewayError).code
      if (code === 'CERT_NOT_PEM') return { error: new GatewayError('FORWARDED_HEADER_INVALID', [header, 'not one URL-encoded PEM certificate'], { cause: err }) }
      // Expired, not signed by TLS_CLIENT_CA_FILE, a CA or not for clients: what OpenSSL
      // refuses at the handshake, refused with the same code.
      const reason = (err as Error).message.replace(/^the certificate in '[^']*' /, '')
      return { error: new GatewayError('CLIENT_CERT_UNTRUSTED', [`forwarded certificate: ${reason}`], { cause: err }), ...(code === 'CERT_EXPIRED' ? { timeDependent: true } : {}) }
    }
    if (hash !== undefined && hash.toLowerCase() !== createHash('sha256').update(x509.raw).digest('hex')) {
      return { error: new GatewayError('FORWARDED_HEADER_INVALID', [header, 'Hash does not match Cert']) }
    }
    return { thumbprint: certificateThumbprint(x509.raw), notBefore: Date.parse(x509.validFrom), notAfter: Date.parse(x509.validTo) }
  }
}
