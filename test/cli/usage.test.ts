import t from 'tap'
import { ehrctl, parseJson } from './harness.js'
import type { JsonError } from './harness.js'

// None of these reach a handler, so no database is needed: parsing fails or help is shown first.
const env = { DATABASE_URL: 'postgres://postgres@127.0.0.1:1/never-contacted' }
const cwd = t.testdir()

const VERBS = [
  ['db', 'migrate'],
  ['machine', 'add'],
  ['machine', 'list'],
  ['machine', 'show'],
  ['machine', 'revoke'],
  ['keys', 'list'],
  ['keys', 'rotate'],
  ['config', 'check']
]

t.test('bad usage exits 2 with commander\'s message on stderr', async t => {
  const cases: Array<[string[], RegExp]> = [
    [['frob'], /^error: unknown command 'frob'/],
    [['machine', 'frob'], /^error: unknown command 'frob'/],
    [['machine', 'lst'], /Did you mean list\?/],
    [['machine', 'add', 'ws-1'], /^error: required option '--cert <pem-file>' not specified/],
    [['machine', 'add', 'ws-1', '--cert'], /^error: option '--cert <pem-file>' argument missing/],
    [['machine', 'add', '--cert', 'x.crt'], /^error: missing required argument 'name'/],
    [['machine', 'show'], /^error: missing required argument 'name'/],
    [['machine', 'list', '--bogus'], /^error: unknown option '--bogus'/],
    [['machine', 'list', 'extra'], /^error: too many arguments/],
    [['keys', 'rotate', 'now'], /^error: too many arguments/]
  ]
  for (const [argv, message] of cases) {
    const r = await ehrctl(argv, { env, cwd })
    t.equal(r.code, 2, argv.join(' '))
    t.equal(r.stdout, '')
    t.match(r.stderr, message)
    t.match(r.stderr, '(add --help for usage)')
  }
})

t.test('a noun without a verb, or nothing at all, shows help on stderr and exits 2', async t => {
  for (const argv of [[], ['machine'], ['keys']]) {
    const r = await ehrctl(argv, { env, cwd })
    t.equal(r.code, 2, argv.join(' ') || '(no arguments)')
    t.equal(r.stdout, '')
    t.match(r.stderr, /^Usage: ehrctl/)
  }
})

t.test('with --json a usage error is an object on stdout', async t => {
  const r = await ehrctl(['machine', 'add', 'ws-1', '--json'], { env, cwd })
  t.equal(r.code, 2)
  t.equal(r.stderr, '')
  t.same(parseJson<JsonError>(r), { error: { code: 'USAGE', message: "required option '--cert <pem-file>' not specified" } })
  const none = await ehrctl(['--json'], { env, cwd })
  t.equal(none.code, 2)
  t.equal(parseJson<JsonError>(none).error.code, 'USAGE')
  // After `--` it is an argument, not the option.
  const literal = await ehrctl(['machine', 'show', '--', '--json'], { env, cwd })
  t.equal(literal.code, 1)
  t.match(literal.stderr, /^ehrctl: cannot connect to the database/)
})

t.test('every verb has --help, exit 0, listing --json', async t => {
  for (const argv of VERBS) {
    const r = await ehrctl([...argv, '--help'], { env, cwd })
    t.equal(r.code, 0, argv.join(' '))
    t.equal(r.stderr, '')
    t.match(r.stdout, new RegExp(`^Usage: ehrctl ${argv.join(' ')} `))
    t.match(r.stdout, '--json')
  }
  const add = await ehrctl(['machine', 'add', '--help'], { env, cwd })
  t.match(add.stdout, '--cert <pem-file>')
  t.match(add.stdout, '--note <text>')
  t.match((await ehrctl(['machine', 'list', '--help'], { env, cwd })).stdout, '--all')
  t.match((await ehrctl(['machine', 'revoke', '--help'], { env, cwd })).stdout, '--reason <text>')
})

t.test('top-level help lists the nouns; `help <noun>` lists its verbs', async t => {
  const top = await ehrctl(['--help'], { env, cwd })
  t.equal(top.code, 0)
  for (const noun of ['db', 'machine', 'keys', 'config']) t.match(top.stdout, new RegExp(`^ {2}${noun} `, 'm'))
  const machine = await ehrctl(['help', 'machine'], { env, cwd })
  t.equal(machine.code, 0)
  for (const verb of ['add', 'list', 'show', 'revoke']) t.match(machine.stdout, new RegExp(`^ {2}${verb} `, 'm'))
})
