import type { Sql, TransactionSql } from 'postgres'
import { GatewayError } from '../errors.js'

// Versioned, append-only. A released migration is never edited: add the next one.
export interface Migration { readonly version: number, readonly name: string, readonly sql: string }

export const migrations: readonly Migration[] = [
  {
    version: 1,
    name: 'machine registry and signing keys',
    sql: `
      create table machines (
        id uuid primary key default gen_random_uuid(),
        name text not null check (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
        -- base64url SHA-256 of the DER certificate: the RFC 8705 x5t#S256 value
        fingerprint text not null unique check (fingerprint ~ '^[A-Za-z0-9_-]{43}$'),
        certificate_pem text not null,
        subject text not null,
        issuer text not null,
        serial_number text not null,
        not_before timestamptz not null,
        not_after timestamptz not null,
        note text,
        created_at timestamptz not null default now(),
        revoked_at timestamptz,
        revoked_reason text
      );
      -- A name is reusable once its machine is revoked; a certificate never is.
      create unique index machines_active_name on machines (name) where revoked_at is null;

      -- One trigger function for every table whose changes running gateways must hear:
      -- notifies channel TG_ARGV[0] with the changed row's column TG_ARGV[1].
      create function notify_row_change() returns trigger language plpgsql as $$
      begin
        perform pg_notify(tg_argv[0],
          to_jsonb(case when tg_op = 'DELETE' then old else new end) ->> tg_argv[1]);
        return null;
      end $$;
      create trigger machines_changed after insert or update or delete on machines
        for each row execute function notify_row_change('ehr_machine_changed', 'fingerprint');

      create table signing_keys (
        kid text primary key,
        alg text not null check (alg in ('EdDSA', 'ES256')),
        public_jwk jsonb not null,
        -- AES-256-GCM under TOKEN_KEY_ENCRYPTION_KEY: iv (12) || tag (16) || ciphertext, kid as AAD
        private_key_encrypted bytea not null,
        created_at timestamptz not null default now(),
        retired_at timestamptz
      );
      create unique index signing_keys_one_current on signing_keys ((true)) where retired_at is null;

      create trigger signing_keys_changed after insert or update or delete on signing_keys
        for each row execute function notify_row_change('ehr_signing_keys_changed', 'kid');
    `
  },
  {
    version: 2,
    name: 'replay store for DPoP proofs and single-use tokens',
    sql: `
      -- RFC 9449 §11.1: every instance must refuse a jti any instance has seen. One row per
      -- consumed identifier ('dpop:<jkt>:<jti>' or 'token:<jti>'), kept until the proof or
      -- token it stands for could no longer be accepted anyway. A logged table: after a
      -- crash, forgotten entries would reopen the replay window.
      create table replay_ids (
        id text primary key check (length(id) <= 300),
        expires_at timestamptz not null
      );
      create index replay_ids_expires_at on replay_ids (expires_at);
    `
  },
  {
    version: 3,
    name: 'audit trail',
    sql: `
      -- One row per request that reached the EHR proxy or the token endpoint (HIPAA
      -- 45 CFR 164.312(b)). Query parameter names only: their values can be patient data.
      create table audit_log (
        id bigint generated always as identity primary key,
        at timestamptz not null,
        -- The gateway's per-request UUID: unique across instances, so a batch retried after
        -- a lost acknowledgement inserts nothing twice (on conflict do nothing).
        request_id uuid not null unique,
        machine_id uuid,
        machine_name text,
        cert_thumbprint text,
        token_jti text,
        client_ip inet,
        method text not null,
        route text not null,
        path text not null,
        resource_type text,
        resource_id text,
        query_params text[] not null default '{}',
        status smallint not null,
        error_code text,
        duration_ms double precision not null,
        upstream_ms double precision,
        bytes_in bigint not null default 0,
        bytes_out bigint not null default 0
      );
      create index audit_log_at on audit_log (at);
      create index audit_log_machine on audit_log (machine_name, at);
      create index audit_log_status on audit_log (status, at);
      create index audit_log_code on audit_log (error_code, at) where error_code is not null;

      -- Append-only. The GRANTs are the control (the gateway's role gets INSERT and SELECT
      -- only; README "Audit trail"); this trigger is defence in depth against an owner or an
      -- over-granted role. The one exception is the retention job (ehrctl audit prune), which
      -- sets ehr_gateway.audit_retention for its own transaction, and even it cannot delete
      -- a row younger than a day by the database's clock.
      create function audit_log_append_only() returns trigger language plpgsql as $$
      begin
        if tg_op = 'DELETE' and current_setting('ehr_gateway.audit_retention', true) = 'on'
           and old.at < now() - interval '1 day' then
          return old;
        end if;
        raise exception 'audit_log is append-only: % refused', tg_op
          using errcode = 'insufficient_privilege',
                hint = 'rows are removed only by ehrctl audit prune, and only when older than a day';
      end $$;
      create trigger audit_log_append_only before update or delete on audit_log
        for each row execute function audit_log_append_only();
      create trigger audit_log_no_truncate before truncate on audit_log
        for each statement execute function audit_log_append_only();
    `
  },
  {
    version: 4,
    name: 'cheaper audit indexes',
    sql: `
      -- Every index is paid on every audited request. Rows arrive in time order, so a BRIN
      -- index serves the ranges on at (ehrctl audit prune, audit list --since, audit export
      -- --since/--until, and list's windows) for a fraction of a btree's insert cost and
      -- size. autosummarize: autovacuum summarises each block range as soon as it is full;
      -- else the newest rows, which most queries ask for, stay unsummarised, and so read,
      -- until the next vacuum of a table that is only ever appended to.
      drop index audit_log_at;
      create index audit_log_at_brin on audit_log using brin (at) with (autosummarize = on);
      -- A status filter runs within a time range (the BRIN index above) or a machine's rows
      -- (audit_log_machine); alone it cost a btree entry per row for a query seldom asked.
      -- Refusals, what auditors look for, keep the partial audit_log_code index: 2xx rows
      -- have no error code and cost it nothing.
      drop index audit_log_status;
    `
  }
]

export const LATEST_VERSION = migrations.reduce((max, m) => Math.max(max, m.version), 0)

// Any fixed number works; it only has to be the same for every process migrating this db.
const MIGRATION_LOCK = 7_204_512_113

export async function schemaVersion (sql: Sql | TransactionSql): Promise<number> {
  const [table] = await sql<Array<{ exists: boolean }>>`select to_regclass('schema_migrations') is not null as exists`
  if (table?.exists !== true) return 0
  const [row] = await sql<Array<{ version: number | null }>>`select max(version)::int as version from schema_migrations`
  return row?.version ?? 0
}

export interface MigrationResult { readonly from: number, readonly to: number, readonly applied: readonly Migration[] }

// Idempotent and safe to run from several processes at once: the advisory lock serialises
// them and each sees what the previous one applied.
export async function migrate (sql: Sql): Promise<MigrationResult> {
  return await sql.begin(async tx => {
    await tx`select pg_advisory_xact_lock(${MIGRATION_LOCK})`
    await tx`create table if not exists schema_migrations (
      version integer primary key,
      name text not null,
      applied_at timestamptz not null default now()
    )`
    const from = await schemaVersion(tx)
    if (from > LATEST_VERSION) throw new GatewayError('DB_SCHEMA_TOO_NEW', [from, LATEST_VERSION])
    // By the versions recorded, not by the highest: a migration numbered below one that a
    // parallel branch already applied (versions are assigned up front) still runs.
    const done = new Set((await tx<Array<{ version: number }>>`select version from schema_migrations`).map(r => r.version))
    const pending = migrations.filter(m => !done.has(m.version))
    for (const m of pending) {
      await tx.unsafe(m.sql)
      await tx`insert into schema_migrations (version, name) values (${m.version}, ${m.name})`
    }
    return { from, to: Math.max(from, LATEST_VERSION), applied: pending }
  })
}

// The gateway never migrates on its own: schema changes are an operator's deliberate step.
export async function assertSchemaCurrent (sql: Sql): Promise<void> {
  const version = await schemaVersion(sql)
  if (version < LATEST_VERSION) throw new GatewayError('DB_NOT_MIGRATED', [version, LATEST_VERSION])
  if (version > LATEST_VERSION) throw new GatewayError('DB_SCHEMA_TOO_NEW', [version, LATEST_VERSION])
}
