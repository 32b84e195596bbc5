import { GatewayError } from '../../shared/errors.js'
import { checkMachineCertificate, parseCaBundle, readPemFile } from '../../shared/certificates.js'
import { MACHINE_NAME, machineRecord, machinesRepository } from '../../shared/db/machines.js'
import { configFor, required, resolvePath, withDatabase } from '../context.js'
import type { Context } from '../context.js'
import type { Human } from '../output.js'
import type { Verb } from '../verb.js'
import { machineFields, machineView } from './view.js'
import type { MachineView } from './view.js'

export interface AddMachineInput {
  readonly name: string
  readonly certFile: string
  readonly note: string | null
}

async function run (input: AddMachineInput, ctx: Context): Promise<MachineView> {
  // Refuse a bad name before reading files or connecting, so the first fix is the cheap one.
  if (!MACHINE_NAME.test(input.name)) throw new GatewayError('MACHINE_NAME_INVALID', [input.name])
  // Only what registration uses: an admin laptop has no gateway TLS key or upstream secrets.
  const config = configFor(ctx, ['database', 'clientCa'])
  const caFile = resolvePath(ctx, required(config.tls.clientCaFile, 'TLS_CLIENT_CA_FILE'))
  const caBundle = parseCaBundle(await readPemFile(caFile), caFile)
  const certFile = resolvePath(ctx, input.certFile)
  const cert = checkMachineCertificate(await readPemFile(certFile), certFile, caBundle, ctx.now())
  const machine = await withDatabase(ctx, config, { schema: 'current' }, async sql =>
    await machinesRepository(sql).add(machineRecord(input.name, cert, input.note)))
  return machineView(machine)
}

function present (m: MachineView, ctx: Context): Human {
  return {
    fields: machineFields(m, ctx.now()),
    notes: [`Registered machine '${m.name}'; running gateways accept its certificate within a second.`]
  }
}

export const addMachineVerb: Verb<AddMachineInput, MachineView> = { run, present }
