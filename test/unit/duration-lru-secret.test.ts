import { inspect } from 'node:util'
import t from 'tap'
import { Lru } from '../../gateway/lru.js'
import { parseDuration } from '../../shared/duration.js'
import { Secret, maskUrlPassword } from '../../shared/secret.js'

t.test('parseDuration', async t => {
  const cases: Array<[string, number | undefined]> = [
    ['500', 500], ['500ms', 500], ['90s', 90_000], ['1 minute', 60_000], ['2 minutes', 120_000],
    ['1m', 60_000], ['1h', 3_600_000], ['1 hour', 3_600_000], ['7d', 604_800_000], ['6y', 6 * 31_557_600_000],
    ['1.5h', 5_400_000], ['', undefined], ['soon', undefined], ['-1s', undefined], ['1 fortnight', undefined]
  ]
  for (const [text, ms] of cases) t.equal(parseDuration(text), ms, text)
})

t.test('Lru evicts the least recently used entry', async t => {
  const lru = new Lru<string, number>(2)
  lru.set('a', 1)
  lru.set('b', 2)
  t.equal(lru.get('a'), 1) // a is now the most recent
  lru.set('c', 3)
  t.equal(lru.get('b'), undefined)
  t.equal(lru.get('a'), 1)
  t.equal(lru.get('c'), 3)
  lru.delete('a')
  t.equal(lru.get('a'), undefined)
  t.equal(lru.size, 1)
  lru.clear()
  t.equal(lru.size, 0)
  t.equal(lru.get('c'), undefined)
})

t.test('Lru keeps the max most recently used entries and holds at most twice max', async t => {
  const max = 100
  const lru = new Lru<number, number>(max)
  const recent: number[] = []
  let largest = 0
  for (let i = 0; i < 10_000; i++) {
    // Every third step reads an older key back, as a kept-alive client's token would be.
    const key = i % 3 === 0 && recent.length > 0 ? recent[Math.floor(recent.length / 2)] as number : i
    if (lru.get(key) === undefined) lru.set(key, key)
    recent.splice(recent.indexOf(key) >>> 0, recent.includes(key) ? 1 : 0)
    recent.push(key)
    if (recent.length > max) recent.shift()
    largest = Math.max(largest, lru.size)
    if (i % 500 === 0) for (const k of recent) t.equal(lru.get(k), k, `key ${k} among the ${max} most recent at step ${i}`)
  }
  t.ok(largest <= 2 * max, `at most 2 × max entries (${largest})`)
  lru.set(recent[0] as number, -1)
  t.equal(lru.get(recent[0] as number), -1, 'set replaces a value in either generation')
})

t.test('Secret never shows its value by accident', async t => {
  const s = new Secret('hunter2')
  t.equal(s.reveal(), 'hunter2')
  for (const shown of [JSON.stringify({ s }), String(s), `${s.toString()}`, inspect({ s })]) {
    t.notMatch(shown, /hunter2/)
  }
  t.equal(maskUrlPassword('postgres://u:pw@h:5432/db'), 'postgres://u:***@h:5432/db')
  t.equal(maskUrlPassword('postgres://h/db'), 'postgres://h/db')
  t.equal(maskUrlPassword('not a url'), '[redacted]')
})
