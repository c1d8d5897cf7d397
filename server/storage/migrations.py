"""Versioned schema, applied at start by every backend in order.

Append new migrations; never edit one that has shipped. Columns named
`*_sealed` hold barrier blobs (system-key version + AES-GCM); the barrier's
rewrap walks SEALED_COLUMNS.
"""
from __future__ import annotations

MIGRATIONS: list[tuple[int, list[str | dict[str, str]]]] = [
    (1, [
        """CREATE TABLE projects (
            id {serial_pk},
            appkey TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL)""",
        """CREATE TABLE keystores (
            id {serial_pk},
            project_id {bigint} NOT NULL REFERENCES projects(id),
            name TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            ip4_auth INTEGER NOT NULL DEFAULT 0,
            mac_auth INTEGER NOT NULL DEFAULT 0,
            cert_auth INTEGER NOT NULL DEFAULT 0,
            auth_mode TEXT NOT NULL DEFAULT 'AND',
            mac_mode TEXT NOT NULL DEFAULT 'attested',
            approval_required INTEGER NOT NULL DEFAULT 0,
            approvals_needed INTEGER NOT NULL DEFAULT 1,
            created_by TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_by TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (project_id, name))""",
        """CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            keystore_id {bigint} NOT NULL REFERENCES keystores(id),
            name TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            key_type TEXT NOT NULL,
            key_spec TEXT NOT NULL,
            status TEXT NOT NULL,
            exportable INTEGER NOT NULL DEFAULT 0,
            imported INTEGER NOT NULL DEFAULT 0,
            auto_rotation_days INTEGER NOT NULL DEFAULT 0,
            next_rotation_at TEXT,
            current_version INTEGER NOT NULL DEFAULT 0,
            deletion_at TEXT,
            last_access_at TEXT,
            created_by TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_by TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (keystore_id, name))""",
        "CREATE INDEX keys_keystore ON keys (keystore_id, status)",
        "CREATE INDEX keys_rotation ON keys (next_rotation_at)",
        "CREATE INDEX keys_deletion ON keys (deletion_at)",
        """CREATE TABLE key_versions (
            key_id TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
            version INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT 'ACTIVE',
            material_sealed {blob} NOT NULL,
            public_der {blob},
            created_at TEXT NOT NULL,
            PRIMARY KEY (key_id, version))""",
        """CREATE TABLE operators (
            id {serial_pk},
            name TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL,
            password_hash TEXT,
            disabled INTEGER NOT NULL DEFAULT 0,
            failed_logins INTEGER NOT NULL DEFAULT 0,
            locked_until TEXT,
            created_at TEXT NOT NULL)""",
        """CREATE TABLE operator_tokens (
            id TEXT PRIMARY KEY,
            operator_id {bigint} NOT NULL REFERENCES operators(id),
            secret_hash TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            expires_at TEXT,
            revoked INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL)""",
    ]),
    (2, [
        # Key-store client authentication data (NHN "auths"): IPv4/CIDR, MAC, certificates.
        """CREATE TABLE auth_ipv4s (
            id {serial_pk},
            keystore_id {bigint} NOT NULL REFERENCES keystores(id),
            value TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'ACTIVE',
            deletion_at TEXT,
            last_access_at TEXT,
            created_by TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_by TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (keystore_id, value))""",
        """CREATE TABLE auth_macs (
            id {serial_pk},
            keystore_id {bigint} NOT NULL REFERENCES keystores(id),
            value TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'ACTIVE',
            deletion_at TEXT,
            last_access_at TEXT,
            created_by TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_by TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (keystore_id, value))""",
        """CREATE TABLE auth_certificates (
            id {serial_pk},
            keystore_id {bigint} NOT NULL REFERENCES keystores(id),
            name TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            fingerprint TEXT NOT NULL UNIQUE,
            serial TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            password_sealed {blob} NOT NULL,
            bundle_sealed {blob} NOT NULL,
            status TEXT NOT NULL DEFAULT 'ACTIVE',
            deletion_at TEXT,
            last_access_at TEXT,
            created_by TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_by TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (keystore_id, name))""",
    ]),
    (3, [
        # Caller credentials of the client API: v1.2 user access keys (per operator, optionally bound
        # to one project) and v1.3 bearer tokens issued from them. Secrets and tokens are stored as
        # SHA-256 digests only (256-bit random values: a fast hash is the right tool).
        """CREATE TABLE user_access_keys (
            id TEXT PRIMARY KEY,
            operator_id {bigint} NOT NULL REFERENCES operators(id),
            project_id {bigint} REFERENCES projects(id),
            secret_hash TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            expires_at TEXT,
            revoked INTEGER NOT NULL DEFAULT 0,
            last_used_at TEXT,
            created_by TEXT NOT NULL,
            created_at TEXT NOT NULL)""",
        "CREATE INDEX user_access_keys_operator ON user_access_keys (operator_id)",
        """CREATE TABLE oauth_tokens (
            id TEXT PRIMARY KEY,
            access_key_id TEXT NOT NULL REFERENCES user_access_keys(id),
            token_hash TEXT NOT NULL UNIQUE,
            expires_at TEXT NOT NULL,
            revoked INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL)""",
        "CREATE INDEX oauth_tokens_access_key ON oauth_tokens (access_key_id)",
        "CREATE INDEX oauth_tokens_expiry ON oauth_tokens (expires_at)",
        "CREATE INDEX auth_certificates_deletion ON auth_certificates (deletion_at)",
    ]),
    (4, [
        # Approval workflow: change requests (secret parameters sealed, never in the JSON) and the
        # approvals given. Audit: an append-only hash chain; audit_head is the single row every
        # append locks first, so the chain stays linear across writers and replicas.
        """CREATE TABLE change_requests (
            id {serial_pk},
            keystore_id {bigint} NOT NULL REFERENCES keystores(id),
            op TEXT NOT NULL,
            params TEXT NOT NULL,
            secrets_sealed {blob},
            diff TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'PENDING',
            approvals_needed INTEGER NOT NULL DEFAULT 1,
            requested_by TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            result TEXT,
            decided_by TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            decided_at TEXT)""",
        "CREATE INDEX change_requests_status ON change_requests (status, expires_at)",
        "CREATE INDEX change_requests_keystore ON change_requests (keystore_id, status)",
        """CREATE TABLE change_approvals (
            request_id {bigint} NOT NULL REFERENCES change_requests(id),
            operator TEXT NOT NULL,
            comment TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            PRIMARY KEY (request_id, operator))""",
        """CREATE TABLE audit_log (
            seq {bigint} PRIMARY KEY,
            at TEXT NOT NULL,
            plane TEXT NOT NULL,
            actor TEXT NOT NULL,
            actor_kind TEXT NOT NULL,
            ip TEXT,
            fingerprint TEXT,
            mac TEXT,
            method TEXT,
            route TEXT,
            action TEXT NOT NULL,
            keystore_id {bigint},
            key_id TEXT,
            status INTEGER,
            result TEXT NOT NULL,
            reason TEXT,
            detail TEXT NOT NULL DEFAULT '{{}}',
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL)""",
        "CREATE INDEX audit_log_at ON audit_log (at)",
        "CREATE INDEX audit_log_key ON audit_log (key_id)",
        """CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY,
            seq {bigint} NOT NULL,
            hash TEXT NOT NULL,
            hmac_key_sealed {blob})""",
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000')",
    ]),
    (5, [
        # Paged key lists sort by (created_at, id) within a store: keep that an index walk at 100k keys.
        "CREATE INDEX keys_keystore_order ON keys (keystore_id, created_at, id)",
    ]),
    (6, [
        # Audit records keyed and scoped (docs/audit.md): the project a record belongs to, whether it
        # changed state, and the keyed tag of its digest. Records before this keep their unkeyed links
        # (keyed_from marks where tags begin). audit_head gains the chain's epoch (sealed) and the
        # checkpoint signing key (sealed); restore_note announces a restore at the next start.
        "ALTER TABLE audit_log ADD COLUMN project_id {bigint}",
        "ALTER TABLE audit_log ADD COLUMN change INTEGER",
        "ALTER TABLE audit_log ADD COLUMN tag TEXT",
        "CREATE INDEX audit_log_project ON audit_log (project_id, seq)",
        "CREATE INDEX audit_log_action ON audit_log (action, seq)",
        "ALTER TABLE audit_head ADD COLUMN keyed_from {bigint}",
        "ALTER TABLE audit_head ADD COLUMN epoch TEXT",
        "ALTER TABLE audit_head ADD COLUMN epoch_sealed {blob}",
        "ALTER TABLE audit_head ADD COLUMN checkpoint_key_sealed {blob}",
        "ALTER TABLE audit_head ADD COLUMN restore_note TEXT",
        "UPDATE audit_head SET keyed_from = seq + 1 WHERE id = 1",
    ]),
    (7, [
        # Separation of duties: operator lineage (who created whom) and role grants with their history
        # (granted by whom, when, revoked by whom, when; rows are never deleted). A grant names a project
        # or none (a global role). Existing operators keep their role as a global grant from the start.
        # Operators are no longer deleted (a tombstone keeps their lineage): `deleted_at`.
        "ALTER TABLE operators ADD COLUMN created_by_id {bigint}",
        "ALTER TABLE operators ADD COLUMN deleted_at TEXT",
        """CREATE TABLE operator_roles (
            id {serial_pk},
            operator_id {bigint} NOT NULL REFERENCES operators(id),
            role TEXT NOT NULL,
            project_id {bigint} REFERENCES projects(id),
            granted_by_id {bigint},
            granted_at TEXT NOT NULL,
            revoked_by_id {bigint},
            revoked_at TEXT)""",
        "CREATE INDEX operator_roles_operator ON operator_roles (operator_id, revoked_at)",
        "INSERT INTO operator_roles (operator_id, role, granted_at) SELECT id, role, created_at FROM operators",
        # Login lockout per (operator, source address) instead of per name.
        """CREATE TABLE login_attempts (
            operator_id {bigint} NOT NULL REFERENCES operators(id),
            source TEXT NOT NULL,
            failures INTEGER NOT NULL DEFAULT 0,
            window_failures INTEGER NOT NULL DEFAULT 0,
            last_failure_at TEXT,
            locked_until TEXT,
            last_success_at TEXT,
            PRIMARY KEY (operator_id, source))""",
        # Custody: who else ever set an operator's password or issued it a credential (a token, an
        # access key). Such an operator may be in that person's hands: lineage follows these edges too.
        """CREATE TABLE operator_custody (
            id {serial_pk},
            operator_id {bigint} NOT NULL REFERENCES operators(id),
            by_id {bigint} NOT NULL,
            what TEXT NOT NULL,
            at TEXT NOT NULL)""",
        "CREATE INDEX operator_custody_operator ON operator_custody (operator_id)",
        "ALTER TABLE projects ADD COLUMN description TEXT NOT NULL DEFAULT ''",
        # Change requests: the requester is an operator id (whatever credential made the request), the
        # request belongs to a project, and operator management requests have no key store.
        {"sqlite": """CREATE TABLE change_requests_v7 (
            id {serial_pk},
            keystore_id {bigint} REFERENCES keystores(id),
            project_id {bigint},
            op TEXT NOT NULL,
            params TEXT NOT NULL,
            secrets_sealed {blob},
            diff TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'PENDING',
            approvals_needed INTEGER NOT NULL DEFAULT 1,
            requested_by TEXT NOT NULL,
            requester_id {bigint},
            credential TEXT,
            reason TEXT NOT NULL DEFAULT '',
            result TEXT,
            decided_by TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            decided_at TEXT)""",
         "postgresql": "ALTER TABLE change_requests ALTER COLUMN keystore_id DROP NOT NULL"},
        {"sqlite": """INSERT INTO change_requests_v7 (id, keystore_id, op, params, secrets_sealed, diff, status,
            approvals_needed, requested_by, reason, result, decided_by, created_at, updated_at, expires_at,
            decided_at) SELECT id, keystore_id, op, params, secrets_sealed, diff, status, approvals_needed,
            requested_by, reason, result, decided_by, created_at, updated_at, expires_at, decided_at
            FROM change_requests""",
         "postgresql": "ALTER TABLE change_requests ADD COLUMN project_id {bigint}"},
        {"sqlite": """CREATE TABLE change_approvals_v7 (
            request_id {bigint} NOT NULL REFERENCES change_requests_v7(id),
            operator TEXT NOT NULL,
            operator_id {bigint},
            comment TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            PRIMARY KEY (request_id, operator))""",
         "postgresql": "ALTER TABLE change_requests ADD COLUMN requester_id {bigint}"},
        {"sqlite": """INSERT INTO change_approvals_v7 (request_id, operator, comment, created_at)
            SELECT request_id, operator, comment, created_at FROM change_approvals""",
         "postgresql": "ALTER TABLE change_requests ADD COLUMN credential TEXT"},
        {"sqlite": "DROP TABLE change_approvals",
         "postgresql": "ALTER TABLE change_approvals ADD COLUMN operator_id {bigint}"},
        {"sqlite": "DROP TABLE change_requests"},
        {"sqlite": "ALTER TABLE change_requests_v7 RENAME TO change_requests"},
        {"sqlite": "ALTER TABLE change_approvals_v7 RENAME TO change_approvals"},
        {"sqlite": "CREATE INDEX change_requests_status ON change_requests (status, expires_at)"},
        {"sqlite": "CREATE INDEX change_requests_keystore ON change_requests (keystore_id, status)"},
        "UPDATE change_requests SET project_id = (SELECT k.project_id FROM keystores k "
        "WHERE k.id = change_requests.keystore_id)",
        "UPDATE change_requests SET requester_id = (SELECT o.id FROM operators o "
        "WHERE o.name = change_requests.requested_by)",
        "UPDATE change_approvals SET operator_id = (SELECT o.id FROM operators o "
        "WHERE o.name = change_approvals.operator)",
        "CREATE INDEX change_requests_project ON change_requests (project_id, status)",
    ]),
    (9, [
        # Rotation roll-out: the version each sidecar host last acknowledged holding, per key. A host is
        # its certificate (SHA-256 fingerprint); `ttl_seconds` is how long its report stays current (the
        # host's own heartbeat promise), after which the roll-out marks it stale. No foreign key to keys:
        # a purged key's rows are simply never asked for again. key_versions.status gains 'DISABLED'.
        """CREATE TABLE key_holdings (
            host_fp TEXT NOT NULL,
            key_id TEXT NOT NULL,
            project_id {bigint} NOT NULL,
            host_name TEXT NOT NULL,
            mac TEXT,
            version INTEGER NOT NULL,
            delivered_at TEXT,
            acked_at TEXT NOT NULL,
            ttl_seconds INTEGER NOT NULL,
            reload_ok INTEGER,
            PRIMARY KEY (host_fp, key_id))""",
        "CREATE INDEX key_holdings_key ON key_holdings (key_id, version)",
    ]),
    (10, [
        # Data-plane usage rollup (server/usage.py): counts per bucket, key store, key ('' = none) and
        # result; span 1 = a minute, 60 = an hour (minutes compacted into hours). Writers ADD to count.
        """CREATE TABLE usage_minutes (
            span INTEGER NOT NULL,
            minute {bigint} NOT NULL,
            keystore_id {bigint} NOT NULL,
            key_id TEXT NOT NULL,
            result TEXT NOT NULL,
            count {bigint} NOT NULL,
            PRIMARY KEY (span, minute, keystore_id, key_id, result))""",
        "CREATE INDEX usage_minutes_store ON usage_minutes (keystore_id, minute)",
    ]),
    (11, [
        # Who may act, sealed to the system key (server/access/seal.py): each row's `seal` is an HMAC of
        # what it allows, under the key in access_seal (NULL until the first start after this seals
        # the rows already here; the audit records that, so a key gone later is tampering).
        "ALTER TABLE operators ADD COLUMN seal TEXT",
        "ALTER TABLE operator_roles ADD COLUMN seal TEXT",
        "ALTER TABLE operator_tokens ADD COLUMN seal TEXT",
        "ALTER TABLE user_access_keys ADD COLUMN seal TEXT",
        "ALTER TABLE oauth_tokens ADD COLUMN seal TEXT",
        """CREATE TABLE access_seal (
            id INTEGER PRIMARY KEY,
            key_sealed {blob})""",
        "INSERT INTO access_seal (id, key_sealed) VALUES (1, NULL)",
    ]),
    (12, [
        # Who may reach what, sealed like who may act: key stores, their client checks, keys, versions, and
        # change requests with their approvals. `tables` names the tables sealed so far; the first start
        # after this seals the new ones (and records it).
        "ALTER TABLE keystores ADD COLUMN seal TEXT",
        "ALTER TABLE auth_ipv4s ADD COLUMN seal TEXT",
        "ALTER TABLE auth_macs ADD COLUMN seal TEXT",
        "ALTER TABLE auth_certificates ADD COLUMN seal TEXT",
        "ALTER TABLE keys ADD COLUMN seal TEXT",
        "ALTER TABLE key_versions ADD COLUMN seal TEXT",
        "ALTER TABLE change_requests ADD COLUMN seal TEXT",
        "ALTER TABLE change_approvals ADD COLUMN seal TEXT",
        "ALTER TABLE access_seal ADD COLUMN tables TEXT NOT NULL DEFAULT ''",
        "UPDATE access_seal SET tables = 'operators,operator_roles,operator_tokens,user_access_keys,oauth_tokens' "
        "WHERE key_sealed IS NOT NULL",
    ]),
    (13, [
        # Every lineage edge into an operator (who granted it a role, set its password, handed it a credential),
        # kept in its own sealed row as well (server/access/lineage.py): deleting a grant or custody row no
        # longer removes the edge. NULL until the first start after this copies the edges already here.
        "ALTER TABLE operators ADD COLUMN lineage TEXT",
    ]),
]

# (table, column, primary-key columns) of every sealed column: the rewrap job's map.
SEALED_COLUMNS: list[tuple[str, str, tuple[str, ...]]] = [
    ("key_versions", "material_sealed", ("key_id", "version")),
    ("auth_certificates", "password_sealed", ("id",)),
    ("auth_certificates", "bundle_sealed", ("id",)),
    ("change_requests", "secrets_sealed", ("id",)),
    ("audit_head", "hmac_key_sealed", ("id",)),
    ("audit_head", "epoch_sealed", ("id",)),
    ("audit_head", "checkpoint_key_sealed", ("id",)),
    ("access_seal", "key_sealed", ("id",)),
]


def render(sql: str | dict[str, str], dialect: str) -> str:
    """A statement for `dialect`; a dict holds per-dialect variants (a missing one is a no-op)."""
    if isinstance(sql, dict):
        sql = sql.get(dialect, "SELECT 1")
    tokens = {
        "sqlite": {"serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "bigint": "INTEGER"},
        "postgresql": {"serial_pk": "BIGSERIAL PRIMARY KEY", "blob": "BYTEA", "bigint": "BIGINT"},
    }[dialect]
    return sql.format(**tokens)


def all_sql():
    """Every statement's SQL text in migration order, each dialect's of a per-dialect statement
    (what readers of the schema history, like the backup's table order, look at)."""
    for _version, statements in MIGRATIONS:
        for stmt in statements:
            yield from (stmt.values() if isinstance(stmt, dict) else (stmt,))
