-- Schema v1 of a hub's PostgreSQL store (node/src/store/postgres.rs): the same
-- tables, columns and meaning as node/migrations/sqlite/0001_initial.sql, in
-- PostgreSQL's types (BIGINT for SQLite's INTEGER, BYTEA for BLOB). Read that file
-- for what each table holds.
--
-- Applied once, inside one transaction, by the migrator in postgres.rs, which
-- records it in `schema_version`. Never edit this file after release: add 0002_*.sql.

CREATE TABLE cases (
    case_id      TEXT   NOT NULL PRIMARY KEY,
    origin       TEXT   NOT NULL,
    modality     TEXT   NOT NULL,
    urgency      TEXT   NOT NULL,
    urgency_rank BIGINT NOT NULL,
    status       TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    deadline_at  BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    record       BYTEA  NOT NULL
);

CREATE INDEX cases_by_urgency ON cases (urgency_rank, deadline_at);
CREATE INDEX cases_by_status ON cases (status);

CREATE TABLE hops (
    envelope_hash TEXT   NOT NULL PRIMARY KEY,
    case_id       TEXT   NOT NULL REFERENCES cases (case_id),
    position      BIGINT NOT NULL,
    signer        TEXT   NOT NULL,
    from_node     TEXT   NOT NULL,
    from_tier     TEXT   NOT NULL,
    to_node       TEXT   NOT NULL,
    to_tier       TEXT   NOT NULL,
    arrived_at    BIGINT NOT NULL,
    left_at       BIGINT NOT NULL,
    skipped       TEXT   NOT NULL,
    reason_kind   TEXT   NOT NULL,
    reason        TEXT   NOT NULL
);

CREATE INDEX hops_by_case ON hops (case_id, position);

CREATE TABLE findings (
    envelope_hash TEXT   NOT NULL PRIMARY KEY,
    case_id       TEXT   NOT NULL REFERENCES cases (case_id),
    position      BIGINT NOT NULL,
    signer        TEXT   NOT NULL,
    node          TEXT   NOT NULL,
    tier          TEXT   NOT NULL,
    reader_kind   TEXT   NOT NULL,
    reader        TEXT   NOT NULL,
    labels        TEXT   NOT NULL,
    at            BIGINT NOT NULL
);

CREATE INDEX findings_by_case ON findings (case_id, position);

CREATE TABLE reports (
    envelope_hash TEXT   NOT NULL PRIMARY KEY,
    case_id       TEXT   NOT NULL REFERENCES cases (case_id),
    signer        TEXT   NOT NULL,
    node          TEXT   NOT NULL,
    tier          TEXT   NOT NULL,
    reader_kind   TEXT   NOT NULL,
    reader        TEXT   NOT NULL,
    machine_made  BIGINT NOT NULL,
    labels        TEXT   NOT NULL,
    text          TEXT   NOT NULL,
    signed_at     BIGINT NOT NULL
);

CREATE INDEX reports_by_case ON reports (case_id);

CREATE TABLE receipts (
    envelope_hash TEXT   NOT NULL PRIMARY KEY,
    case_id       TEXT   NOT NULL REFERENCES cases (case_id),
    kind          TEXT   NOT NULL,
    signer        TEXT   NOT NULL,
    receiver      TEXT   NOT NULL,
    from_node     TEXT,
    subject_hash  TEXT   NOT NULL,
    at            BIGINT NOT NULL
);

CREATE INDEX receipts_by_case ON receipts (case_id);

CREATE TABLE audit (
    seq       BIGINT NOT NULL PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    kind      TEXT   NOT NULL,
    case_id   TEXT,
    peer      TEXT,
    detail    TEXT   NOT NULL,
    prev_hash BYTEA  NOT NULL,
    hash      BYTEA  NOT NULL,
    signer    BYTEA  NOT NULL,
    signature BYTEA  NOT NULL
);

CREATE INDEX audit_by_case ON audit (case_id);

-- Append-only, enforced by the database.
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit log is append-only: % refused', TG_OP;
END;
$$;

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
