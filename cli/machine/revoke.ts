import { machinesRepository } from '../../shared/db/machines.js'
import { configFor, withDatabase } from '../context.js'
import type { Context } from '../context.js'
import { formatTime } from '../output.js'
import type { Human } from '../output.js'
import type { Verb } from '../verb.js'
import { machineView } from './view.js'
import type { MachineView } from './view.js'

export interface RevokeMachineInput {
  readonly name: string
  readonly reason: string | null
}

async function run (input: RevokeMachineInput, ctx: Context): Promise<MachineView> {
  const config = configFor(ctx, ['database'])
  const machine = await withDatabase(ctx, config, { schema: 'current' }, async sql =>
    await machinesRepository(sql).revoke(input.name, input.reason))
  return machineView(machine)
}

function present (m: MachineView): Human {
  return {
    notes: [
      `Revoked machine '${m.name}' (${m.fingerprint}) at ${formatTime(m.revokedAt)}.`,
      // The machines trigger NOTIFYs every gateway, which drops the cached identity.
      'Running gateways refuse its certificate and its tokens within a second.'
    ]
  }
}

export const revokeMachineVerb: Verb<RevokeMachineInput, MachineView> = { run, present }
