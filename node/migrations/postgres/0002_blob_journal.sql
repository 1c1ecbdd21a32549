-- Schema v2: the blob journal; see node/migrations/sqlite/0002_blob_journal.sql.
CREATE TABLE blob_journal (
    hash  TEXT  NOT NULL PRIMARY KEY,
    bytes BYTEA NOT NULL
);
