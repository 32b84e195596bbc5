import t from 'tap'
import { requestId } from '../../gateway/request-id.js'

const UUID_V7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/

t.test('request ids are RFC 9562 version-7 UUIDs carrying the time', async t => {
  const at = Date.UTC(2026, 11, 3, 12, 0, 0, 123)
  const id = requestId(at)
  t.match(id, UUID_V7)
  t.equal(parseInt(id.slice(0, 8) + id.slice(9, 13), 16), at, 'the first 48 bits are the Unix time in ms')
  t.match(requestId(), UUID_V7)
})

t.test('ids sort by time across milliseconds and never repeat', async t => {
  const ids = Array.from({ length: 2000 }, (_, i) => requestId(1_780_000_000_000 + Math.floor(i / 10)))
  t.equal(new Set(ids).size, ids.length)
  for (let i = 10; i < ids.length; i += 10) t.ok((ids[i - 1] as string) < (ids[i] as string), `ms ${i / 10} sorts after ms ${i / 10 - 1}`)
})
