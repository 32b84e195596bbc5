import t from 'tap'
import { BatchedLog } from '../../gateway/log-destination.js'

t.test('lines are written together once the batch is full', async t => {
  const writes: string[] = []
  const log = new BatchedLog({ write: data => writes.push(data) }, { maxBytes: 10, maxDelayMs: 60_000 })
  log.write('12345\n')
  t.same(writes, [], 'held while below the size')
  log.write('67890\n')
  t.same(writes, ['12345\n67890\n'], 'one write for both lines')
  log.flush()
  t.same(writes, ['12345\n67890\n'], 'nothing left to flush')
})

t.test('a lone line is written after the delay, and flush writes what is held', async t => {
  const writes: string[] = []
  const log = new BatchedLog({ write: data => writes.push(data) }, { maxDelayMs: 5 })
  log.write('one\n')
  await new Promise(resolve => setTimeout(resolve, 30))
  t.same(writes, ['one\n'], 'written by the timer')
  log.write('two\n')
  log.flush()
  t.same(writes, ['one\n', 'two\n'], 'flushed on demand')
})
