import { GatewayError } from '../../shared/errors.js'
import { machinesRepository } from '../../shared/db/machines.js'
import { configFor, withDatabase } from '../context.js'
import type { Context } from '../context.js'
import type { Human } from '../output.js'
import type { Verb } from '../verb.js'
import { machineFields, machineView } from './view.js'
import type { MachineView } from './view.js'

export interface ShowMachineInput {
  readonly name: string
}

// The PEM is in the data (--json) but not in the human view, where it would bury the rest.
export interface ShowMachineOutput extends MachineView {
  readonly certificatePem: string
}

async function run (input: ShowMachineInput, ctx: Context): Promise<ShowMachineOutput> {
  const config = configFor(ctx, ['database'])
  const machine = await withDatabase(ctx, config, { schema: 'current' }, async sql =>
    await machinesRepository(sql).findByName(input.name))
  if (machine === undefined) throw new GatewayError('MACHINE_UNKNOWN', [input.name])
  return { ...machineView(machine), certificatePem: machine.certificatePem }
}

function present (m: ShowMachineOutput, ctx: Context): Human {
  return { fields: machineFields(m, ctx.now()) }
}

export const showMachineVerb: Verb<ShowMachineInput, ShowMachineOutput> = { run, present }
