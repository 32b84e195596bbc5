import type { Machine } from '../../shared/db/machines.js'
import { formatTime } from '../output.js'

// The registry row as ehrctl shows it. An explicit shape rather than the row itself, so
// a column added to the table later does not silently change the --json contract.
export interface MachineView {
  readonly id: string
  readonly name: string
  readonly state: 'active' | 'revoked'
  readonly fingerprint: string
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

export function machineView (m: Machine): MachineView {
  return {
    id: m.id,
    name: m.name,
    state: m.revokedAt === null ? 'active' : 'revoked',
    fingerprint: m.fingerprint,
    subject: m.subject,
    issuer: m.issuer,
    serialNumber: m.serialNumber,
    notBefore: m.notBefore,
    notAfter: m.notAfter,
    note: m.note,
    createdAt: m.createdAt,
    revokedAt: m.revokedAt,
    revokedReason: m.revokedReason
  }
}

// X509Certificate#subject puts one RDN per line; a field is one line.
const oneLine = (dn: string): string => dn.split('\n').join(', ')

export function validity (m: MachineView, now: Date): string {
  const expired = m.notAfter.getTime() <= now.getTime() ? ' (expired)' : ''
  return `${formatTime(m.notBefore)} to ${formatTime(m.notAfter)}${expired}`
}

export function machineFields (m: MachineView, now: Date): Array<[string, string]> {
  const fields: Array<[string, string]> = [
    ['Name', m.name],
    ['ID', m.id],
    ['State', m.state],
    ['Fingerprint', `${m.fingerprint} (x5t#S256)`],
    ['Subject', oneLine(m.subject)],
    ['Issuer', oneLine(m.issuer)],
    ['Serial', m.serialNumber],
    ['Valid', validity(m, now)],
    ['Note', m.note ?? '-'],
    ['Registered', formatTime(m.createdAt)]
  ]
  if (m.revokedAt !== null) {
    fields.push(['Revoked', formatTime(m.revokedAt)], ['Reason', m.revokedReason ?? '-'])
  }
  return fields
}
