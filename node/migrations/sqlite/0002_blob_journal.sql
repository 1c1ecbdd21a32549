-- Schema v2: the blob journal (docs/adr/0010-small-attachments-journaled-in-the-store.md).
--
-- The bytes of a small attachment received from a peer are committed here in the
-- same transaction as the case that now holds it, so that one flush makes both
-- durable before the custody receipt leaves. The blob's file under objects/ is
-- written after that commit without fsync; once a background sync has made the file
-- durable, its row is deleted. On start, every row left is checked against its
-- file (rewritten from here if missing or damaged) before the node runs.
CREATE TABLE blob_journal (
    hash  TEXT NOT NULL PRIMARY KEY,  -- SHA-256 of bytes, 64 lowercase hex digits
    bytes BLOB NOT NULL
) STRICT;
