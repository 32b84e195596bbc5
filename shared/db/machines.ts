import type { Sql } from 'postgres'
import type { MachineCertificate } from '../certificates.js'
import { GatewayError } from '../errors.js'

export interface Machine {
  readonly id: string
  readonly name: string
  readonly fingerprint: string
  readonly certificatePem: string
  readonly subject: string
  readonly issuer: string
  readonly serialNumber: string
  readonly notBefore: Date
  readonly notAfter: Date
  readonly note: string | null
  readonly createdAt: Date
  readonly revokedAt: Date | null
  readonly revokedReason: string | null
}

export type NewMachine = Omit<Machine, 'id' | 'createdAt' | 'revokedAt' | 'revokedReason'>

// The registry row for a checked certificate: what `ehrctl machine add` stores.
export function machineRecord (name: string, cert: MachineCertificate, note: string | null): NewMachine {
  return {
    name,
    fingerprint: cert.fingerprint,
    certificatePem: cert.pem,
    subject: cert.x509.subject,
    issuer: cert.x509.issuer,
    serialNumber: cert.x509.serialNumber,
    notBefore: new Date(cert.x509.validFrom),
    notAfter: new Date(cert.x509.validTo),
    note
  }
}

export const MACHINE_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/

// Channel the machines trigger (migration 1) notifies with the changed fingerprint.
export const MACHINE_CHANNEL = 'ehr_machine_changed'

interface PgError { code?: string, constraint_name?: string }

export function machinesRepository (sql: Sql) {
  async function findByFingerprint (fingerprint: string): Promise<Machine | undefined> {
    const [row] = await sql<Machine[]>`select * from machines where fingerprint = ${fingerprint}`
    return row
  }

  // The active machine of that name, else its most recently revoked namesake.
  async function findByName (name: string): Promise<Machine | undefined> {
    const [row] = await sql<Machine[]>`
      select * from machines where name = ${name}
      order by revoked_at is null desc, revoked_at desc limit 1`
    return row
  }

  async function add (input: NewMachine): Promise<Machine> {
    if (!MACHINE_NAME.test(input.name)) throw new GatewayError('MACHINE_NAME_INVALID', [input.name])
    try {
      const [row] = await sql<Machine[]>`insert into machines ${sql(input as unknown as Record<string, unknown>,
        'name', 'fingerprint', 'certificatePem', 'subject', 'issuer', 'serialNumber', 'notBefore', 'notAfter', 'note')}
        returning *`
      return row as Machine
    } catch (err) {
      const pg = err as PgError
      if (pg.code === '23505' && pg.constraint_name === 'machines_fingerprint_key') {
        const holder = await findByFingerprint(input.fingerprint)
        throw new GatewayError('CERT_ALREADY_REGISTERED', [holder?.name ?? '?', holder?.revokedAt != null ? ' (revoked)' : ''], { cause: err })
      }
      if (pg.code === '23505' && pg.constraint_name === 'machines_active_name') {
        throw new GatewayError('MACHINE_NAME_TAKEN', [input.name], { cause: err })
      }
      throw err
    }
  }

  async function list (options: { includeRevoked?: boolean } = {}): Promise<Machine[]> {
    return options.includeRevoked === true
      ? await sql<Machine[]>`select * from machines order by name, created_at`
      : await sql<Machine[]>`select * from machines where revoked_at is null order by name`
  }

  async function revoke (name: string, reason: string | null): Promise<Machine> {
    const [row] = await sql<Machine[]>`
      update machines set revoked_at = now(), revoked_reason = ${reason}
      where name = ${name} and revoked_at is null returning *`
    if (row !== undefined) return row
    const existing = await findByName(name)
    throw existing === undefined
      ? new GatewayError('MACHINE_UNKNOWN', [name])
      : new GatewayError('MACHINE_ALREADY_REVOKED', [name])
  }

  return { add, list, findByName, findByFingerprint, revoke }
}

export type MachinesRepository = ReturnType<typeof machinesRepository>
