import { MIN_AUDIT_RETENTION_MS, auditRepository } from '../../shared/db/audit.js'
import { GatewayError } from '../../shared/errors.js'
import { configFor, withDatabase } from '../context.js'
import type { Context } from '../context.js'
import { formatTime } from '../output.js'
import type { Human } from '../output.js'
import type { Verb } from '../verb.js'

export interface PruneAuditInput {
  readonly olderThanMs: number
}

export interface PruneAuditOutput {
  readonly deleted: number
  // Approximate: the database's clock decides.
  readonly before: Date
}

// The retention job: needs a DATABASE_URL whose role may DELETE from audit_log (the
// gateway's own role may not; README "Audit trail").
async function run (input: PruneAuditInput, ctx: Context): Promise<PruneAuditOutput> {
  if (input.olderThanMs < MIN_AUDIT_RETENTION_MS) throw new GatewayError('AUDIT_RETENTION_TOO_SHORT', [`${Math.round(input.olderThanMs / 60_000)} minutes`])
  const config = configFor(ctx, ['database'])
  const deleted = await withDatabase(ctx, config, { schema: 'current' }, async sql =>
    await auditRepository(sql).prune(input.olderThanMs))
  return { deleted, before: new Date(ctx.now().getTime() - input.olderThanMs) }
}

function present (out: PruneAuditOutput): Human {
  return { notes: [`Deleted ${out.deleted} audit row${out.deleted === 1 ? '' : 's'} from before ${formatTime(out.before)}.`] }
}

export const pruneAuditVerb: Verb<PruneAuditInput, PruneAuditOutput> = { run, present }
