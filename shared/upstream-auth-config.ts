import { createPrivateKey } from 'node:crypto'
import type { KeyObject } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { Secret } from './secret.js'

// The upstream token source, settled from the environment (issue 4). At most one source;
// EHR_API_KEY is separate and may accompany any of them.
export type UpstreamTokenSourceConfig = GoogleOAuthConfig | GoogleServiceAccountConfig | SmartConfig

export interface GoogleOAuthConfig {
  readonly mode: 'google-oauth'
  // Not a secret (it is in every consent URL), so it shows in `ehrctl config check`.
  readonly clientId: string
  readonly clientSecret: Secret
  readonly redirectUri: string | undefined
  readonly refreshToken: Secret
  // undefined: the library's own Google endpoint
  readonly tokenUrl: URL | undefined
  readonly quotaProject: string | undefined
}

export interface GoogleServiceAccountConfig {
  readonly mode: 'google-service-account'
  readonly credentialsFile: string
  readonly clientEmail: string
  readonly privateKey: Secret
  readonly privateKeyId: string | undefined
  readonly scopes: readonly string[]
  readonly tokenUrl: URL | undefined
  readonly quotaProject: string | undefined
}

export type SmartAlg = 'ES384' | 'RS384'

export interface SmartConfig {
  readonly mode: 'smart'
  readonly tokenUrl: URL
  readonly clientId: string
  readonly privateKeyFile: string
  readonly privateKey: Secret
  readonly keyId: string | undefined
  readonly alg: SmartAlg
  readonly scope: string | undefined
}

export const UPSTREAM_AUTH_MODES = {
  'google-oauth': 'Google OAuth2 client (refresh token)',
  'google-service-account': 'Google service account (JWT bearer)',
  smart: 'SMART Backend Services (client credentials, private_key_jwt)'
} as const

// Cloud Healthcare API's own scope: the narrowest that reaches FHIR stores.
export const DEFAULT_GOOGLE_SCOPES = ['https://www.googleapis.com/auth/cloud-healthcare']

interface Problem { readonly variable: string, readonly message: string }
type Read = (name: string) => string | undefined

const LOCAL_HOSTS = ['localhost', '127.0.0.1', '[::1]']

// Token requests carry our client secret or a signed assertion; like the upstream itself,
// only over TLS in production unless the endpoint is on this host.
function tokenUrl (variable: string, raw: string | undefined, production: boolean, problems: Problem[]): URL | undefined {
  if (raw === undefined) return undefined
  let url: URL
  try {
    url = new URL(raw)
  } catch {
    problems.push({ variable, message: 'is not a valid URL' })
    return undefined
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    problems.push({ variable, message: 'must be an https:// URL' })
  } else if (url.username !== '' || url.password !== '' || url.hash !== '') {
    problems.push({ variable, message: 'must not contain credentials or a fragment' })
  } else if (production && url.protocol === 'http:' && !LOCAL_HOSTS.includes(url.hostname)) {
    problems.push({ variable, message: 'must be https:// in production (plain http only to localhost)' })
  }
  return url
}

function readKeyFile (variable: string, file: string, problems: Problem[]): string | undefined {
  try {
    return readFileSync(file, 'utf8')
  } catch (err) {
    problems.push({ variable, message: `cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? 'error'})` })
    return undefined
  }
}

function privateKey (pem: string): KeyObject | undefined {
  try {
    return createPrivateKey(pem)
  } catch {
    return undefined
  }
}

function serviceAccount (str: Read, problems: Problem[]): Omit<GoogleServiceAccountConfig, 'tokenUrl' | 'quotaProject'> | undefined {
  const variable = 'GOOGLE_APPLICATION_CREDENTIALS'
  const file = str(variable) as string
  const text = readKeyFile(variable, file, problems)
  if (text === undefined) return undefined
  let json: Record<string, unknown>
  try {
    json = JSON.parse(text) as Record<string, unknown>
  } catch {
    problems.push({ variable, message: `${file} is not JSON (download the key from IAM → Service accounts → Keys)` })
    return undefined
  }
  if (json['type'] !== 'service_account') {
    problems.push({ variable, message: `${file} is not a service-account key ("type": "service_account"); for a user's refresh token use GOOGLE_OAUTH_*` })
    return undefined
  }
  const email = json['client_email']
  const pem = json['private_key']
  const key = typeof pem === 'string' ? privateKey(pem) : undefined
  if (typeof email !== 'string' || email === '') {
    problems.push({ variable, message: `${file} has no client_email` })
    return undefined
  }
  // The JWT-bearer assertion is RS256 (RFC 7523 as Google implements it): an RSA key.
  if (key === undefined || key.asymmetricKeyType !== 'rsa') {
    problems.push({ variable, message: `${file} has no valid RSA private_key` })
    return undefined
  }
  const keyId = json['private_key_id']
  const scopes = (str('GOOGLE_SCOPES') ?? DEFAULT_GOOGLE_SCOPES.join(' ')).split(/[\s,]+/).filter(s => s !== '')
  return {
    mode: 'google-service-account',
    credentialsFile: file,
    clientEmail: email,
    privateKey: new Secret(pem as string),
    privateKeyId: typeof keyId === 'string' ? keyId : undefined,
    scopes
  }
}

// RFC 7518 §3.1 / SMART Backend Services: the two algorithms servers must support.
function smartAlg (key: KeyObject): SmartAlg | undefined {
  if (key.asymmetricKeyType === 'rsa') return 'RS384'
  if (key.asymmetricKeyType === 'ec' && key.asymmetricKeyDetails?.namedCurve === 'secp384r1') return 'ES384'
  return undefined
}

function smart (str: Read, production: boolean, problems: Problem[]): SmartConfig | undefined {
  const missing = ['SMART_TOKEN_URL', 'SMART_CLIENT_ID', 'SMART_PRIVATE_KEY_FILE'].filter(v => str(v) === undefined)
  for (const variable of missing) problems.push({ variable, message: 'is required with the other SMART_* variables' })
  const url = tokenUrl('SMART_TOKEN_URL', str('SMART_TOKEN_URL'), production, problems)
  const file = str('SMART_PRIVATE_KEY_FILE')
  const pem = file === undefined ? undefined : readKeyFile('SMART_PRIVATE_KEY_FILE', file, problems)
  const key = pem === undefined ? undefined : privateKey(pem)
  let alg: SmartAlg | undefined
  if (pem !== undefined) {
    const keyAlg = key === undefined ? undefined : smartAlg(key)
    // An unknown value is the schema's problem already.
    const named = str('SMART_ALG')
    const wanted = named === 'ES384' || named === 'RS384' ? named : undefined
    if (key === undefined || key.type !== 'private') {
      problems.push({ variable: 'SMART_PRIVATE_KEY_FILE', message: `${file ?? ''} is not a PEM private key` })
    } else if (keyAlg === undefined) {
      problems.push({ variable: 'SMART_PRIVATE_KEY_FILE', message: 'must be an EC P-384 (ES384) or RSA (RS384) private key' })
    } else if (wanted !== undefined && wanted !== keyAlg) {
      problems.push({ variable: 'SMART_ALG', message: `is ${wanted} but SMART_PRIVATE_KEY_FILE holds a key for ${keyAlg}` })
    } else {
      alg = keyAlg
    }
  }
  if (missing.length > 0 || url === undefined || alg === undefined || pem === undefined || file === undefined) return undefined
  return {
    mode: 'smart',
    tokenUrl: url,
    clientId: str('SMART_CLIENT_ID') as string,
    privateKeyFile: file,
    privateKey: new Secret(pem),
    keyId: str('SMART_KEY_ID'),
    alg,
    scope: str('SMART_SCOPE')
  }
}

const OAUTH_VARS = ['GOOGLE_OAUTH_CLIENT_ID', 'GOOGLE_OAUTH_CLIENT_SECRET', 'GOOGLE_OAUTH_REFRESH_TOKEN']
const SMART_VARS = ['SMART_TOKEN_URL', 'SMART_CLIENT_ID', 'SMART_PRIVATE_KEY_FILE', 'SMART_KEY_ID', 'SMART_SCOPE', 'SMART_ALG']

// Which token source the environment asks for, validated; problems name variables only.
export function parseUpstreamAuth (str: Read, production: boolean, problems: Problem[]): UpstreamTokenSourceConfig | undefined {
  const oauthSet = [...OAUTH_VARS, 'GOOGLE_OAUTH_REDIRECT_URI'].filter(v => str(v) !== undefined)
  const smartSet = SMART_VARS.filter(v => str(v) !== undefined)
  const wanted = [
    oauthSet.length > 0 ? 'GOOGLE_OAUTH_*' : undefined,
    str('GOOGLE_APPLICATION_CREDENTIALS') !== undefined ? 'GOOGLE_APPLICATION_CREDENTIALS' : undefined,
    smartSet.length > 0 ? 'SMART_*' : undefined
  ].filter((w): w is string => w !== undefined)
  if (wanted.length > 1) {
    // Two sources would each claim the Authorization header; which one wins must not be a guess.
    for (const w of wanted) problems.push({ variable: w, message: `only one upstream token source may be set, found ${wanted.join(' and ')}` })
    return undefined
  }
  const google = wanted[0] === 'GOOGLE_OAUTH_*' || wanted[0] === 'GOOGLE_APPLICATION_CREDENTIALS'
  for (const variable of ['GOOGLE_TOKEN_URL', 'GOOGLE_QUOTA_PROJECT', 'GOOGLE_SCOPES']) {
    if (!google && str(variable) !== undefined) problems.push({ variable, message: 'applies only with GOOGLE_OAUTH_* or GOOGLE_APPLICATION_CREDENTIALS' })
  }
  if (str('GOOGLE_SCOPES') !== undefined && wanted[0] === 'GOOGLE_OAUTH_*') {
    problems.push({ variable: 'GOOGLE_SCOPES', message: 'applies only to a service account (a refresh token carries the scopes it was granted)' })
  }
  const googleTokenUrl = google ? tokenUrl('GOOGLE_TOKEN_URL', str('GOOGLE_TOKEN_URL'), production, problems) : undefined
  const quotaProject = str('GOOGLE_QUOTA_PROJECT')
  switch (wanted[0]) {
    case 'GOOGLE_OAUTH_*': {
      const missing = OAUTH_VARS.filter(v => str(v) === undefined)
      for (const variable of missing) problems.push({ variable, message: 'is required with the other GOOGLE_OAUTH_* variables' })
      if (missing.length > 0) return undefined
      return {
        mode: 'google-oauth',
        clientId: str('GOOGLE_OAUTH_CLIENT_ID') as string,
        clientSecret: new Secret(str('GOOGLE_OAUTH_CLIENT_SECRET') as string),
        redirectUri: str('GOOGLE_OAUTH_REDIRECT_URI'),
        refreshToken: new Secret(str('GOOGLE_OAUTH_REFRESH_TOKEN') as string),
        tokenUrl: googleTokenUrl,
        quotaProject
      }
    }
    case 'GOOGLE_APPLICATION_CREDENTIALS': {
      const sa = serviceAccount(str, problems)
      return sa === undefined ? undefined : { ...sa, tokenUrl: googleTokenUrl, quotaProject }
    }
    case 'SMART_*':
      return smart(str, production, problems)
    default:
      return undefined
  }
}
