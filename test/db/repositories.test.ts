import { randomBytes } from 'node:crypto'
import { X509Certificate } from 'node:crypto'
import postgres from 'postgres'
import t from 'tap'
import { createDevCa } from '../../gateway/demo/pki.js'
import { describeCertificate } from '../../shared/certificates.js'
import { MACHINE_CHANNEL, machineRecord, machinesRepository } from '../../shared/db/machines.js'
import type { NewMachine } from '../../shared/db/machines.js'
import { replayRepository } from '../../shared/db/replay.js'
import { signingKeysRepository } from '../../shared/db/signing-keys.js'
import { decryptPrivateKey, generateSigningKey, publicKeyOf } from '../../shared/keys.js'
import { createTestDatabase } from '../helpers/db.js'
import { createSign, createVerify, sign, verify } from 'node:crypto'

const ca = await createDevCa()

async function newMachine (name: string): Promise<NewMachine> {
  const pair = await ca.issueClient({ commonName: name })
  return machineRecord(name, describeCertificate(new X509Certificate(pair.cert)), 'front desk')
}

t.test('machines: constraints, revocation, name reuse, notifications', async t => {
  const { sql } = await createTestDatabase(t)
  const machines = machinesRepository(sql)
  const heard: string[] = []
  const { unlisten } = await sql.listen(MACHINE_CHANNEL, fp => { heard.push(fp) })
  t.teardown(unlisten)

  const first = await newMachine('ws-01')
  const added = await machines.add(first)
  t.equal(added.name, 'ws-01')
  t.equal(added.note, 'front desk')
  t.equal(added.revokedAt, null)
  t.ok(added.notAfter instanceof Date)

  await t.rejects(machines.add({ ...(await newMachine('x')), name: 'ws-01' }), { code: 'MACHINE_NAME_TAKEN' })
  await t.rejects(machines.add({ ...first, name: 'ws-02' }), { code: 'CERT_ALREADY_REGISTERED', message: /ws-01/ })
  await t.rejects(machines.add({ ...(await newMachine('x')), name: 'Bad Name!' }), { code: 'MACHINE_NAME_INVALID' })
  await t.rejects(sql`update machines set fingerprint = 'short' where name = 'ws-01'`, /check constraint/)

  const revoked = await machines.revoke('ws-01', 'stolen')
  t.ok(revoked.revokedAt instanceof Date)
  t.equal(revoked.revokedReason, 'stolen')
  await t.rejects(machines.revoke('ws-01', null), { code: 'MACHINE_ALREADY_REVOKED' })
  await t.rejects(machines.revoke('nobody', null), { code: 'MACHINE_UNKNOWN' })
  await t.rejects(machines.add({ ...first, name: 'ws-03' }), { code: 'CERT_ALREADY_REGISTERED', message: /revoked/ }, 'a revoked certificate never comes back')

  const renewed = await machines.add(await newMachine('ws-01'))
  t.not(renewed.id, added.id, 'the name is reusable after revocation')
  t.equal((await machines.findByName('ws-01'))?.id, renewed.id, 'show prefers the active machine')
  t.equal((await machines.list()).length, 1)
  t.equal((await machines.list({ includeRevoked: true })).length, 2)
  t.equal((await machines.findByFingerprint(first.fingerprint))?.revokedReason, 'stolen')

  for (let i = 0; i < 50 && heard.length < 3; i++) await new Promise(resolve => setTimeout(resolve, 20))
  t.ok(heard.includes(first.fingerprint), 'changes are notified with the fingerprint')
})

t.test('signing keys: encrypted at rest, one current, rotation retires', async t => {
  const { sql } = await createTestDatabase(t)
  const keys = signingKeysRepository(sql)
  const kek = randomBytes(32)
  const first = await keys.ensureCurrent(async () => await generateSigningKey('EdDSA', kek))
  const again = await keys.ensureCurrent(async () => await generateSigningKey('EdDSA', kek))
  t.equal(again.kid, first.kid, 'the first key is created once')

  const der = decryptPrivateKey(first, kek).export({ format: 'der', type: 'pkcs8' })
  t.notOk(first.privateKeyEncrypted.includes(der.subarray(-32)), 'the private key is not stored in the clear')
  const message = Buffer.from('hello')
  t.ok(verify(null, message, publicKeyOf(first), sign(null, message, decryptPrivateKey(first, kek))))
  t.throws(() => decryptPrivateKey(first, randomBytes(32)), { code: 'KEY_DECRYPT_FAILED' })
  t.throws(() => decryptPrivateKey({ ...first, kid: 'another-kid' }, kek), { code: 'KEY_DECRYPT_FAILED' }, 'the kid is bound as AAD')

  const second = await keys.rotateTo(await generateSigningKey('ES256', kek))
  const rows = await keys.list()
  t.equal(rows.filter(r => r.retiredAt === null).length, 1)
  t.equal(rows.find(r => r.retiredAt === null)?.kid, second.kid)
  t.equal((await keys.verifying(300)).length, 2, 'the retired key still verifies during the grace period')
  await sql`update signing_keys set retired_at = now() - interval '1 hour' where kid = ${first.kid}`
  t.same((await keys.verifying(300)).map(r => r.kid), [second.kid])
  const es = decryptPrivateKey(second, kek)
  const s = createSign('sha256').update(message).sign(es)
  t.ok(createVerify('sha256').update(message).verify(publicKeyOf(second), s))
  await t.rejects(sql`insert into signing_keys (kid, alg, public_jwk, private_key_encrypted) values ('x', 'HS256', '{}', '\\x00')`, /check constraint/)
})

t.test('replay ids: a batch returns each new id once; statements holding the same ids cannot deadlock', async t => {
  const { url, sql } = await createTestDatabase(t)
  const replay = replayRepository(sql)
  const at = new Date(Date.now() + 60_000)
  const entry = (id: string): { id: string, expiresAt: Date } => ({ id, expiresAt: at })

  // Postgres skips a key repeated within one `insert … on conflict do nothing` and returns it
  // once: no error, but also no way to tell the two uses apart (the store dedupes first).
  t.same([...await replay.consumeBatch([entry('r:a'), entry('r:b'), entry('r:a')])].sort(), ['r:a', 'r:b'])
  t.same([...await replay.consumeBatch([entry('r:a'), entry('r:c')])], ['r:c'], 'only the new one')
  t.same([...await replay.consumeBatch([])], [])
  await t.rejects(replay.consumeBatch([entry('r:a'), entry('x'.repeat(301))]), /check constraint/, 'one bad id fails the statement…')
  t.same([...await replay.consumeBatch([entry('r:d')])], ['r:d'], '…which consumed nothing of it')

  // Another transaction holds r:lock-a uncommitted. A statement with [b, a] that locked b
  // first would wait for a while holding b; the holder then inserting b would deadlock
  // (one of the two aborted after deadlock_timeout). In id order, the statement waits at a
  // holding nothing.
  const other = postgres(url, { max: 1, onnotice: () => {} })
  t.teardown(async () => { await other.end({ timeout: 1 }) })
  const holder = other.begin(async tx => {
    await tx`insert into replay_ids (id, expires_at) values ('r:lock-a', ${at})`
    const batch = replay.consumeBatch([entry('r:lock-b'), entry('r:lock-a')])
    batch.catch(() => {})
    await new Promise(resolve => setTimeout(resolve, 200))
    await tx`set local lock_timeout = '3s'`
    await tx`insert into replay_ids (id, expires_at) values ('r:lock-b', ${at})`
    // Wrapped: the transaction must commit before the statement can finish.
    return { batch }
  })
  const { batch } = await holder
  t.same([...await batch], [], 'no deadlock; both ids were the other transaction\'s')
})
