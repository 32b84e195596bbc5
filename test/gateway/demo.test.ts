// `npm run demo` as a user runs it: the built entry point in a child process, with its own
// data directory, against the suite's Postgres. `npm test` builds dist/ before tap runs.
import { spawn } from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import { existsSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import postgres from 'postgres'
import t from 'tap'
import type { Test } from 'tap'

const demo = fileURLToPath(new URL('../../dist/gateway/demo/demo.js', import.meta.url))
const skip = existsSync(demo) ? false : `${demo} is missing: run the suite with \`npm test\`, which builds first`

interface Run { child: ChildProcess, output: () => string, exit: Promise<{ code: number | null, signal: NodeJS.Signals | null }> }

function startDemo (t: Test, args: string[]): Run {
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    // Port 0 everywhere: the suite runs files in parallel and a developer may have the demo open.
    DEMO_PORT: '0',
    DEMO_OPS_PORT: '0',
    DEMO_DATA_DIR: t.testdir({}),
    LOG_LEVEL: 'warn'
  }
  delete env['DEMO_EXIT_AFTER_FLOW']
  const child = spawn(process.execPath, [demo, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout?.on('data', (chunk: Buffer) => { output += chunk.toString() })
  child.stderr?.on('data', (chunk: Buffer) => { output += chunk.toString() })
  const exit = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>(resolve => {
    child.once('close', (code, signal) => { resolve({ code, signal }) })
  })
  // A failing assertion must not leave a demo (and its Postgres) running.
  t.teardown(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL') })
  return { child, output: () => output, exit }
}

async function waitFor (run: Run, text: string, ms: number): Promise<void> {
  const deadline = Date.now() + ms
  while (!run.output().includes(text)) {
    if (Date.now() > deadline || run.child.exitCode !== null) throw new Error(`demo never printed '${text}':\n${run.output()}`)
    await new Promise(resolve => setTimeout(resolve, 50))
  }
}

// With DATABASE_URL the demo works in a database of its own there; it must be gone after.
async function assertDatabaseDropped (t: Test, output: string): Promise<void> {
  const url = process.env['DATABASE_URL']
  if (url === undefined || url === '') return
  const name = /\/(ehr_gateway_demo_[0-9a-f]+)\b/.exec(output)?.[1]
  if (name === undefined) {
    t.fail('the demo did not name its throwaway database', { output })
    return
  }
  const admin = postgres(url, { max: 1, onnotice: () => {} })
  try {
    const rows = await admin`select 1 from pg_database where datname = ${name}`
    t.equal(rows.length, 0, `${name} was dropped`)
  } finally {
    await admin.end({ timeout: 1 })
  }
}

t.test('demo --check runs the flow, prints the curl commands and stops cleanly', { skip, timeout: 90_000 }, async t => {
  const run = startDemo(t, ['--check'])
  const { code } = await run.exit
  const output = run.output()
  t.equal(code, 0, 'exits 0 after a successful flow', { output })
  t.match(output, /✓ 200 {2}POST \/v1\/token with the ws-demo-01 certificate/)
  t.match(output, /✓ 200 {2}GET \/fhir\/Patient\/example-0001 with the token/)
  t.match(output, /✓ 401 .*\n.*"code":"CLIENT_CERT_REQUIRED"/)
  t.match(output, /✓ 401 .*\n.*"code":"TOKEN_INVALID"/)
  t.notMatch(output, /✗/)
  t.match(output, /curl --cacert \/\S+\/pki\/ca\.crt --cert \/\S+\/pki\/ws-demo-01\.crt --key \/\S+\/pki\/ws-demo-01\.key -X POST https:\/\/localhost:\d+\/v1\/token/)
  t.match(output, /TOKEN=\$\(curl .* -s -X POST https:\/\/localhost:\d+\/v1\/token \| node -pe /)
  t.match(output, /-H "Authorization: Bearer \$TOKEN" https:\/\/localhost:\d+\/fhir\/Patient\/example-0001/)
  t.match(output, /curl http:\/\/127\.0\.0\.1:\d+\/metrics/)
  t.match(output, /export DATABASE_URL='?postgres(ql)?:\/\/\S+'? TLS_CLIENT_CA_FILE=\/\S+ca\.crt/)
  t.match(output, /ehrctl\.js machine list/)
  t.match(output, /nothing left running/)
  await assertDatabaseDropped(t, output)
})

t.test('SIGINT stops a running demo in order with exit code 0', { skip, timeout: 90_000 }, async t => {
  const run = startDemo(t, [])
  await waitFor(run, 'Press Ctrl-C', 60_000)
  run.child.kill('SIGINT')
  const { code, signal } = await run.exit
  const output = run.output()
  t.equal(signal, null, 'exits by itself, not by the signal', { output })
  t.equal(code, 0, 'exit code 0', { output })
  t.match(output, /SIGINT: stopping…\nStopped ops listener, gateway, upstream pool, FHIR upstream, database/)
  t.match(output, /nothing left running/)
  await assertDatabaseDropped(t, output)
})
