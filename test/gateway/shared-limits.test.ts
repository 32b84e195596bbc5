import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Agent } from 'undici'
import type { Test } from 'tap'
import { startGateway } from '../helpers/gateway.js'
import type { TestGateway } from '../helpers/gateway.js'
import { assertProblem, closedPort } from '../helpers/assert.js'
import { startRedis } from '../helpers/redis.js'

const bearer = (token: string): Record<string, string> => ({ authorization: `Bearer ${token}` })

async function redisUp (gw: TestGateway): Promise<number> {
  return (await gw.app.gateway.metrics.rateLimitRedisUp.get()).values[0]?.value ?? -1
}

async function fallbacks (gw: TestGateway): Promise<number> {
  return (await gw.app.gateway.metrics.rateLimitFallback.get()).values[0]?.value ?? 0
}

async function waitFor (t: Test, what: string, done: () => Promise<boolean>): Promise<void> {
  const started = Date.now()
  while (!(await done())) {
    if (Date.now() - started > 15_000) {
      t.fail(`timed out waiting: ${what}`)
      return
    }
    await sleep(50)
  }
  t.pass(what)
}

// `count` proxied calls spread over the instances in turn; the statuses in order.
async function spread (gws: ReadonlyArray<{ gw: TestGateway, agent: Agent }>, token: string, count: number): Promise<number[]> {
  const statuses: number[] = []
  for (let i = 0; i < count; i++) {
    const { gw, agent } = gws[i % gws.length] as { gw: TestGateway, agent: Agent }
    statuses.push((await gw.call(agent, `/fhir/Patient/${i}`, { headers: bearer(token) })).status)
  }
  return statuses
}

t.test('two instances share one limit through Redis, fall back per instance while it is down, and share again when it returns', async t => {
  const redis = await startRedis(t)
  const env = { REDIS_URL: redis.url, RATE_LIMIT_MAX: '6', RATE_LIMIT_FALLBACK_MAX: '3' }
  const a = await startGateway(t, { env })
  const b = await startGateway(t, { env, db: a.db, pki: a.pki, upstream: a.upstream })
  await waitFor(t, 'both instances reach Redis', async () => await redisUp(a) === 1 && await redisUp(b) === 1)
  const { pair } = await a.register('ws-shared')
  const viaA = { gw: a, agent: a.agent(pair) }
  const viaB = { gw: b, agent: b.agent(pair) }
  const token = await a.fetchToken(viaA.agent) // 1 of 6

  await t.test('shared: 6 in all, whichever instance serves them', async t => {
    t.same(await spread([viaB, viaA], token, 5), [200, 200, 200, 200, 200])
    const res = await b.call(viaB.agent, '/fhir/Patient/x', { headers: bearer(token) })
    assertProblem(t, res, 429, 'RATE_LIMITED')
    assertProblem(t, await a.call(viaA.agent, '/fhir/Patient/x', { headers: bearer(token) }), 429, 'RATE_LIMITED')
    t.equal(await fallbacks(a) + await fallbacks(b), 0, 'no request fell back')
  })

  await t.test('Redis down: traffic keeps flowing, each instance enforcing RATE_LIMIT_FALLBACK_MAX', async t => {
    await redis.stop()
    await waitFor(t, 'both instances notice', async () => await redisUp(a) === 0 && await redisUp(b) === 0)
    const started = performance.now()
    const seenA = await spread([viaA], token, 4)
    const seenB = await spread([viaB], token, 4)
    t.same(seenA, [200, 200, 200, 429], 'instance A: its own 3')
    t.same(seenB, [200, 200, 200, 429], 'instance B: its own 3')
    t.ok(performance.now() - started < 5000, 'no request waited on the dead Redis')
    const limited = await a.call(viaA.agent, '/fhir/Patient/x', { headers: bearer(token) })
    t.equal(limited.headers['x-ratelimit-limit'], '3', 'the fallback limit is announced')
    t.ok(await fallbacks(a) >= 4 && await fallbacks(b) >= 4, 'counted in ehr_gateway_rate_limit_fallback_total')
    const metrics = await a.app.gateway.metrics.registry.metrics()
    t.match(metrics, /ehr_gateway_rate_limit_redis_up 0/)
    const warnings = a.logs.filter(l => l.includes('Redis unreachable'))
    t.equal(warnings.length, 1, 'logged once for the outage, not per request')
    t.notMatch(warnings.join(''), /password/)
  })

  await t.test('Redis back on the same port: shared limiting resumes by itself', async t => {
    await redis.start()
    await waitFor(t, 'both instances reconnect', async () => await redisUp(a) === 1 && await redisUp(b) === 1)
    // the restarted Redis is empty: a fresh shared budget of 6
    t.same(await spread([viaA, viaB], token, 7), [200, 200, 200, 200, 200, 200, 429])
    t.match(b.logs.join(''), /Redis answers again/)
  })
})

t.test('a Redis that is unreachable from the start: the gateway starts and limits per instance', async t => {
  const port = await closedPort()
  const gw = await startGateway(t, { env: { REDIS_URL: `redis://:hunter2-secret@127.0.0.1:${port}/0`, RATE_LIMIT_MAX: '50', RATE_LIMIT_FALLBACK_MAX: '2' } })
  const { pair } = await gw.register('ws-alone')
  const agent = gw.agent(pair)
  const token = await gw.fetchToken(agent)
  t.equal((await gw.call(agent, '/fhir/Patient/1', { headers: bearer(token) })).status, 200)
  assertProblem(t, await gw.call(agent, '/fhir/Patient/2', { headers: bearer(token) }), 429, 'RATE_LIMITED')
  t.notMatch(gw.logs.join(''), /hunter2-secret/, 'the Redis password never reaches the log')
  t.match(JSON.stringify(gw.config), /redis:\/\/:\*\*\*@127\.0\.0\.1/, 'the settled config masks it')
})

t.test('a Redis that hangs (connection open, no answers): requests do not wait on it, and it is probed back', async t => {
  const redis = await startRedis(t)
  const gw = await startGateway(t, { env: { REDIS_URL: redis.url, RATE_LIMIT_MAX: '100', RATE_LIMIT_FALLBACK_MAX: '100' } })
  await waitFor(t, 'connected', async () => await redisUp(gw) === 1)
  const { pair } = await gw.register('ws-hang')
  const agent = gw.agent(pair)
  const token = await gw.fetchToken(agent)
  redis.pause()
  t.teardown(() => { redis.resume() })
  const started = performance.now()
  t.equal((await gw.call(agent, '/fhir/Patient/1', { headers: bearer(token) })).status, 200, 'served by the fallback')
  t.ok(performance.now() - started < 10_000, `the first request waited only the command timeout (${Math.round(performance.now() - started)} ms)`)
  t.equal(await redisUp(gw), 0)
  const next = performance.now()
  t.equal((await gw.call(agent, '/fhir/Patient/2', { headers: bearer(token) })).status, 200)
  t.ok(performance.now() - next < 5000, 'later requests do not ask the hung Redis at all')
  redis.resume()
  await waitFor(t, 'a probe finds it answering again', async () => await redisUp(gw) === 1)
})
