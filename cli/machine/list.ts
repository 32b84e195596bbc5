import { machinesRepository } from '../../shared/db/machines.js'
import { configFor, withDatabase } from '../context.js'
import type { Context } from '../context.js'
import { formatTime } from '../output.js'
import type { Human } from '../output.js'
import type { Verb } from '../verb.js'
import { machineView } from './view.js'
import type { MachineView } from './view.js'

export interface ListMachinesInput {
  readonly all: boolean
}

async function run (input: ListMachinesInput, ctx: Context): Promise<MachineView[]> {
  const config = configFor(ctx, ['database'])
  const rows = await withDatabase(ctx, config, { schema: 'current' }, async sql =>
    await machinesRepository(sql).list({ includeRevoked: input.all }))
  return rows.map(machineView)
}

function present (machines: MachineView[], ctx: Context): Human {
  const now = ctx.now().getTime()
  return {
    table: {
      columns: ['name', 'state', 'fingerprint', 'not after', 'registered', 'revoked'],
      rows: machines.map(m => [
        m.name,
        m.state,
        m.fingerprint,
        formatTime(m.notAfter) + (m.notAfter.getTime() <= now ? ' (expired)' : ''),
        formatTime(m.createdAt),
        formatTime(m.revokedAt)
      ]),
      empty: 'No machines registered. Add one with `ehrctl machine add <name> --cert <pem-file>`.'
    }
  }
}

export const listMachinesVerb: Verb<ListMachinesInput, MachineView[]> = { run, present }
