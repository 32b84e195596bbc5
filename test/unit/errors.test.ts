import t from 'tap'
import { GatewayError, errorSpecs, problemType, toProblem } from '../../shared/errors.js'
import type { ErrorCode } from '../../shared/errors.js'

t.test('every registry key is its own code, with a status, title and fix', async t => {
  for (const code of Object.keys(errorSpecs) as ErrorCode[]) {
    const err = new GatewayError(code, ['x', 'y'])
    t.equal(err.code, code)
    t.equal(err.statusCode, errorSpecs[code].status)
    t.match(code, /^[A-Z][A-Z_]+$/)
    t.ok(errorSpecs[code].title.length > 0 && errorSpecs[code].fix.length > 0, `${code} documented`)
    t.ok(err.statusCode >= 400 && err.statusCode < 600)
  }
})

t.test('problem documents follow RFC 9457 and carry the code', async t => {
  const problem = toProblem(new GatewayError('MACHINE_REVOKED', ['ws-01']), 'req-1')
  t.same(problem, {
    type: problemType('MACHINE_REVOKED'),
    title: 'Machine revoked',
    status: 403,
    detail: "machine 'ws-01' has been revoked",
    code: 'MACHINE_REVOKED',
    instance: 'urn:request:req-1'
  })
})

t.test('withHeaders keeps code and detail, adds headers', async t => {
  const base = new GatewayError('TOKEN_INVALID', ['signature does not verify'])
  const challenged = base.withHeaders({ 'www-authenticate': 'Bearer' })
  t.equal(challenged.code, 'TOKEN_INVALID')
  t.equal(challenged.message, base.message)
  t.same(challenged.headers, { 'www-authenticate': 'Bearer' })
  t.equal(challenged.cause, base)
})

t.test('every code is documented in the README', async t => {
  const { readFile } = await import('node:fs/promises')
  const readme = await readFile(new URL('../../README.md', import.meta.url), 'utf8')
  for (const code of Object.keys(errorSpecs)) t.ok(readme.includes(`\`${code}\``), `${code} in README`)
})
