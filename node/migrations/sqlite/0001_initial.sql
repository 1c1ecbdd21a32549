-- Schema v1 of a node's SQLite store (node/src/store.rs).
--
-- `cases` holds the whole record the core persists (ADR 0002) as CBOR, plus index
-- columns for listing. `hops`, `findings`, `reports` and `receipts` are derived from
-- the signed envelopes in that record, one row per envelope keyed by the SHA-256 of
-- its exact bytes; they are an index for people and tools, never read back by the
-- core. `audit` is the append-only, hash-chained, signed audit log.
--
-- Applied once, inside one transaction, by the migrator in store.rs, which records
-- it in `schema_version`. Never edit this file after release: add 0002_*.sql.

CREATE TABLE cases (
    case_id      TEXT    NOT NULL PRIMARY KEY,  -- 32 lowercase hex digits
    origin       TEXT    NOT NULL,
    modality     TEXT    NOT NULL,              -- ecg | imaging | pathology
    urgency      TEXT    NOT NULL,              -- stat | urgent | routine
    urgency_rank INTEGER NOT NULL,              -- 0 stat, 1 urgent, 2 routine
    status       TEXT    NOT NULL,              -- CaseStatus::name()
    created_at   INTEGER NOT NULL,              -- ms since the Unix epoch
    deadline_at  INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    record       BLOB    NOT NULL               -- CBOR of tiers::CaseRecord
) STRICT;

CREATE INDEX cases_by_urgency ON cases (urgency_rank, deadline_at);
CREATE INDEX cases_by_status ON cases (status);

-- Signed HopRecords of the case's trail.
CREATE TABLE hops (
    envelope_hash TEXT    NOT NULL PRIMARY KEY,
    case_id       TEXT    NOT NULL REFERENCES cases (case_id),
    position      INTEGER NOT NULL,             -- index in the trail, oldest first
    signer        TEXT    NOT NULL,             -- Ed25519 public key, hex
    from_node     TEXT    NOT NULL,
    from_tier     TEXT    NOT NULL,
    to_node       TEXT    NOT NULL,
    to_tier       TEXT    NOT NULL,
    arrived_at    INTEGER NOT NULL,
    left_at       INTEGER NOT NULL,
    skipped       TEXT    NOT NULL,             -- JSON array of node names
    reason_kind   TEXT    NOT NULL,
    reason        TEXT    NOT NULL              -- for people
) STRICT;

CREATE INDEX hops_by_case ON hops (case_id, position);

-- Signed Findings made on the way.
CREATE TABLE findings (
    envelope_hash TEXT    NOT NULL PRIMARY KEY,
    case_id       TEXT    NOT NULL REFERENCES cases (case_id),
    position      INTEGER NOT NULL,
    signer        TEXT    NOT NULL,
    node          TEXT    NOT NULL,
    tier          TEXT    NOT NULL,
    reader_kind   TEXT    NOT NULL,             -- model | expert
    reader        TEXT    NOT NULL,             -- model@version or expert name
    labels        TEXT    NOT NULL,             -- JSON array of {label, confidence}
    at            INTEGER NOT NULL
) STRICT;

CREATE INDEX findings_by_case ON findings (case_id, position);

-- The signed Report of a case.
CREATE TABLE reports (
    envelope_hash TEXT    NOT NULL PRIMARY KEY,
    case_id       TEXT    NOT NULL REFERENCES cases (case_id),
    signer        TEXT    NOT NULL,
    node          TEXT    NOT NULL,
    tier          TEXT    NOT NULL,
    reader_kind   TEXT    NOT NULL,
    reader        TEXT    NOT NULL,
    machine_made  INTEGER NOT NULL,             -- 0 | 1
    labels        TEXT    NOT NULL,
    text          TEXT    NOT NULL,
    signed_at     INTEGER NOT NULL
) STRICT;

CREATE INDEX reports_by_case ON reports (case_id);

-- Signed custody receipts (from the node that took the case from here) and report
-- receipts (from the node the report was delivered down to).
CREATE TABLE receipts (
    envelope_hash TEXT    NOT NULL PRIMARY KEY,
    case_id       TEXT    NOT NULL REFERENCES cases (case_id),
    kind          TEXT    NOT NULL,             -- custody | report
    signer        TEXT    NOT NULL,
    receiver      TEXT    NOT NULL,
    from_node     TEXT,                         -- custody receipts only
    subject_hash  TEXT    NOT NULL,             -- manifest hash or report hash
    at            INTEGER NOT NULL
) STRICT;

CREATE INDEX receipts_by_case ON receipts (case_id);

-- The audit log. hash = SHA-256 over the canonical encoding of (seq, at_ms, kind,
-- case_id, peer, detail, prev_hash, signer); signature = Ed25519 by `signer` over
-- hash. See `audit_hash` in store.rs.
CREATE TABLE audit (
    seq       INTEGER NOT NULL PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    kind      TEXT    NOT NULL,
    case_id   TEXT,
    peer      TEXT,
    detail    TEXT    NOT NULL,
    prev_hash BLOB    NOT NULL,
    hash      BLOB    NOT NULL,
    signer    BLOB    NOT NULL,
    signature BLOB    NOT NULL
) STRICT;

CREATE INDEX audit_by_case ON audit (case_id);

-- Append-only, enforced by the database.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: UPDATE refused');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: DELETE refused');
END;
