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
  t.equal(lru.size, 1)
  lru.clear()
  t.equal(lru.size, 0)
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
