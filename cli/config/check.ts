import { ConfigError, GATEWAY_NEEDS, readDotenv } from '../../shared/config.js'
import type { Config, ConfigProblem } from '../../shared/config.js'
import { GatewayError } from '../../shared/errors.js'
import { Secret } from '../../shared/secret.js'
import { TokenFetchError, createUpstreamCredentials } from '../../shared/upstream-auth.js'
import { configFor, resolvePath } from '../context.js'
import type { Context } from '../context.js'
import type { Human } from '../output.js'
import type { Verb } from '../verb.js'
import { tlsFileProblems } from './tls-files.js'
import type { TlsPaths } from './tls-files.js'

export interface CheckConfigInput {
  // Fetch one upstream token to prove the credentials work.
  readonly probe: boolean
}

export interface CheckConfigOutput {
  readonly ok: true
  // Secrets inside are Secret objects: they serialise and print as [redacted].
  readonly config: Config
  readonly upstreamAuth: {
    readonly mode: string
    readonly description: string
    // Only the expiry of the probed token: the token itself is never printed.
    readonly probe: { readonly expiresAt: string } | { readonly skipped: string } | undefined
  }
}

async function probe (config: Config, ctx: Context): Promise<NonNullable<CheckConfigOutput['upstreamAuth']['probe']>> {
  const credentials = createUpstreamCredentials(config.upstream, { clock: () => ctx.now().getTime() })
  try {
    const token = await credentials.probe()
    if (token === undefined) return { skipped: 'no upstream token source is configured (nothing to fetch)' }
    return { expiresAt: token.expiresAt.toISOString() }
  } catch (err) {
    // Say what the endpoint answered, which the gateway's client-facing error never does.
    const cause = err instanceof GatewayError ? err.cause : undefined
    const why = cause instanceof TokenFetchError ? `: ${cause.message}` : ''
    throw new GatewayError('UPSTREAM_AUTH_FAILED', [`could not be obtained (${credentials.mode})${why}`])
  }
}

// When the schema already refused the environment there is no Config to take the paths
// from; the raw variables still let the file checks run, so one run lists every problem.
function pathsFromEnv (ctx: Context): TlsPaths {
  const env = { ...(ctx.dotenvPath === false ? {} : readDotenv(ctx.dotenvPath)), ...ctx.env }
  const path = (name: string): string | undefined => env[name] === '' ? undefined : env[name]
  return { certFile: path('TLS_CERT_FILE'), keyFile: path('TLS_KEY_FILE'), clientCaFile: path('TLS_CLIENT_CA_FILE') }
}

async function run (input: CheckConfigInput, ctx: Context): Promise<CheckConfigOutput> {
  const problems: ConfigProblem[] = []
  let config: Config | undefined
  try {
    config = configFor(ctx, GATEWAY_NEEDS)
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err
    problems.push(...err.problems)
  }
  const paths = config?.tls ?? pathsFromEnv(ctx)
  const absolute = (file: string | undefined): string | undefined => file === undefined ? undefined : resolvePath(ctx, file)
  problems.push(...await tlsFileProblems({
    certFile: absolute(paths.certFile),
    keyFile: absolute(paths.keyFile),
    clientCaFile: absolute(paths.clientCaFile)
  }, ctx.now()))
  if (problems.length > 0 || config === undefined) throw new ConfigError(problems)
  const { mode, description } = createUpstreamCredentials(config.upstream)
  const upstreamAuth = { mode, description, probe: input.probe ? await probe(config, ctx) : undefined }
  return { ok: true, config, upstreamAuth }
}

function flatten (value: unknown, prefix: string, out: Array<[string, string]>): void {
  if (value instanceof Secret || value instanceof URL) {
    out.push([prefix, String(value)])
  } else if (Array.isArray(value)) {
    out.push([prefix, value.length === 0 ? '(none)' : value.join(', ')])
  } else if (value !== null && typeof value === 'object') {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix === '' ? k : `${prefix}.${k}`, out)
  } else {
    out.push([prefix, value === undefined ? '(unset)' : String(value)])
  }
}

function probeNote (probe: CheckConfigOutput['upstreamAuth']['probe'], now: Date): string[] {
  if (probe === undefined) return []
  if ('skipped' in probe) return [`Token probe skipped: ${probe.skipped}.`]
  const seconds = Math.round((Date.parse(probe.expiresAt) - now.getTime()) / 1000)
  return [`Token probe: fetched an upstream access token; it expires at ${probe.expiresAt} (in ${seconds} s).`]
}

function present (out: CheckConfigOutput, ctx: Context): Human {
  const fields: Array<[string, string]> = []
  flatten(out.config, '', fields)
  return {
    fields,
    notes: [
      'Configuration is valid: every variable parses and the TLS files load and match.',
      `Upstream authentication: ${out.upstreamAuth.description}.`,
      ...probeNote(out.upstreamAuth.probe, ctx.now())
    ]
  }
}

export const checkConfigVerb: Verb<CheckConfigInput, CheckConfigOutput> = { run, present }
