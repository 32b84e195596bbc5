import { configFor, withDatabase } from '../context.js'
import type { Context } from '../context.js'
import { migrate } from '../../shared/db/migrations.js'
import type { Human } from '../output.js'
import type { Verb } from '../verb.js'

export type MigrateInput = Record<string, never>

export interface MigrateOutput {
  readonly from: number
  readonly to: number
  readonly applied: ReadonlyArray<{ readonly version: number, readonly name: string }>
}

async function run (_input: MigrateInput, ctx: Context): Promise<MigrateOutput> {
  const config = configFor(ctx, ['database'])
  const result = await withDatabase(ctx, config, { schema: 'any' }, migrate)
  return {
    from: result.from,
    to: result.to,
    applied: result.applied.map(m => ({ version: m.version, name: m.name }))
  }
}

function present (out: MigrateOutput): Human {
  if (out.applied.length === 0) return { notes: [`Schema is at version ${out.to}; nothing to apply.`] }
  return {
    notes: [
      `Migrated schema from version ${out.from} to ${out.to}:`,
      ...out.applied.map(m => `  ${m.version}  ${m.name}`)
    ]
  }
}

export const migrateVerb: Verb<MigrateInput, MigrateOutput> = { run, present }
