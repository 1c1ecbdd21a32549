//! The chunk hash index of a complete blob: the content hash (BLAKE3) of each of its
//! [`CHUNK_LEN_MAX`]-aligned chunks, computed once when the blob is stored (imported,
//! or received with every chunk verified) and kept beside it in
//! `chunks/<blob hash hex>`, so that a sender answers chunk requests without hashing
//! the bytes again.
//!
//! File format: the chunk hashes in order (32 bytes each), then a seal: BLAKE3 over
//! a domain tag, the blob's hash and every chunk hash. An index whose length or seal
//! does not match is ignored (the sender then hashes the chunk as it reads it), so a
//! torn or damaged index can cost speed, never correctness; and because an index
//! hash is the hash of the bytes as they were stored, a blob damaged on disk since is
//! caught by the receiver's per-chunk check instead of being served as good.
//!
//! Indexes are written with a temporary file and a rename, without fsync: they are a
//! cache of what the blob's bytes say, never the only copy of anything.
//!
//! This module must never decide what is served to whom, and never let an unsealed
//! index stand for a chunk's hash.

use federation_proto::codec::CHUNK_LEN_MAX;
use federation_proto::{ContentHash, ContentHasher};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The chunk length the index is kept for (requests of other lengths are hashed as
/// they are read).
pub const INDEX_CHUNK_LEN: u64 = CHUNK_LEN_MAX as u64;
/// Indexes of blobs larger than this are not kept (the index is 1/8192 of the blob;
/// this bounds one in memory to 8 MiB).
pub const INDEX_BLOB_LEN_MAX: u64 = 64 * 1024 * 1024 * 1024;
/// Indexes kept in memory at most (the most recently loaded).
pub const INDEX_CACHE_MAX: usize = 64;
/// v2: chunk hashes are BLAKE3 (ADR 0012); a v1 index (SHA-256) fails its seal and
/// is ignored.
const SEAL_DOMAIN: &[u8] = b"telemed-chunk-index-v2\0";

/// Chunks in a blob of `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(INDEX_CHUNK_LEN)
}

fn seal(blob: &ContentHash, hashes: &[ContentHash]) -> ContentHash {
    let mut h = ContentHasher::new();
    h.update(SEAL_DOMAIN);
    h.update(&blob.0);
    for c in hashes {
        h.update(&c.0);
    }
    h.finalize()
}

/// Hashes aligned chunks as a blob's bytes stream past, from offset 0.
#[derive(Debug, Default)]
pub struct ChunkHasher {
    current: ContentHasher,
    in_current: u64,
    hashes: Vec<ContentHash>,
}

impl ChunkHasher {
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = ((INDEX_CHUNK_LEN - self.in_current) as usize).min(bytes.len());
            self.current.update(&bytes[..take]);
            self.in_current += take as u64;
            bytes = &bytes[take..];
            if self.in_current == INDEX_CHUNK_LEN {
                self.push();
            }
        }
    }

    fn push(&mut self) {
        let done = std::mem::take(&mut self.current);
        self.hashes.push(done.finalize());
        self.in_current = 0;
    }

    /// The hashes of every chunk, the last (short) one included.
    pub fn finish(mut self) -> Vec<ContentHash> {
        if self.in_current > 0 {
            self.push();
        }
        self.hashes
    }
}

/// The index directory and a bounded cache of indexes read from it.
#[derive(Debug)]
pub struct ChunkIndexes {
    dir: PathBuf,
    cache: Mutex<HashMap<ContentHash, Arc<Vec<ContentHash>>>>,
}

impl ChunkIndexes {
    pub fn new(dir: PathBuf) -> ChunkIndexes {
        ChunkIndexes { dir, cache: Mutex::default() }
    }

    fn path(&self, blob: &ContentHash) -> PathBuf {
        self.dir.join(blob.to_string())
    }

    /// Writes the index of `blob` (`hashes`, one per chunk of a `size`-byte blob).
    /// Refuses (and writes nothing) if the count does not fit the size; failures
    /// are logged, never fatal: the index is only a speed-up. A blob of one chunk
    /// gets no file: its chunk's hash is its own name ([`ChunkIndexes::chunk_hash`]),
    /// and a file per small blob cost an inode allocation on the custody path.
    pub fn write(&self, blob: &ContentHash, size: u64, hashes: &[ContentHash]) {
        if hashes.len() as u64 != chunk_count(size) || size > INDEX_BLOB_LEN_MAX || size <= INDEX_CHUNK_LEN {
            return;
        }
        let mut bytes = Vec::with_capacity((hashes.len() + 1) * 32);
        for h in hashes {
            bytes.extend_from_slice(&h.0);
        }
        bytes.extend_from_slice(&seal(blob, hashes).0);
        let path = self.path(blob);
        let tmp = self.dir.join(format!("{blob}.{:016x}.tmp", rand::random::<u64>()));
        let result = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(%blob, "chunk index not written (chunks will be hashed when served): {e}");
        }
    }

    /// The hash of the aligned chunk `index` of `blob` (`size` bytes), if a sealed
    /// index is kept for it, or if the blob is that one chunk: then it is the blob's
    /// own hash, the name it is stored under once its bytes matched it (and, as with
    /// an index, bytes damaged on disk since fail the receiver's check of it).
    pub fn chunk_hash(&self, blob: &ContentHash, size: u64, index: u64) -> Option<ContentHash> {
        if size <= INDEX_CHUNK_LEN {
            return (size > 0 && index == 0).then_some(*blob);
        }
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(blob).cloned();
        let hashes = match cached {
            Some(h) => h,
            None => {
                let h = Arc::new(self.load(blob, size)?);
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= INDEX_CACHE_MAX
                    && let Some(evict) = cache.keys().next().copied()
                {
                    cache.remove(&evict);
                }
                cache.insert(*blob, h.clone());
                h
            }
        };
        if hashes.len() as u64 != chunk_count(size) {
            return None;
        }
        hashes.get(usize::try_from(index).ok()?).copied()
    }

    fn load(&self, blob: &ContentHash, size: u64) -> Option<Vec<ContentHash>> {
        if size > INDEX_BLOB_LEN_MAX {
            return None;
        }
        let expected = (chunk_count(size) as usize + 1) * 32;
        let path = self.path(blob);
        let len = std::fs::metadata(&path).ok()?.len();
        if len != expected as u64 {
            return None;
        }
        let bytes = std::fs::read(&path).ok()?;
        let mut hashes: Vec<ContentHash> =
            bytes.chunks_exact(32).map(|c| ContentHash(c.try_into().expect("32 bytes"))).collect();
        let stored_seal = hashes.pop()?;
        if seal(blob, &hashes) != stored_seal {
            tracing::warn!(%blob, "chunk index does not match its seal; ignored");
            return None;
        }
        Some(hashes)
    }

    /// Where the index of `blob` is kept (tests).
    pub fn path_of(&self, blob: &ContentHash) -> PathBuf {
        self.path(blob)
    }

    /// The directory of the indexes.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(dir: &Path) -> ChunkIndexes {
        ChunkIndexes::new(dir.to_owned())
    }

    #[test]
    fn chunk_hasher_cuts_at_aligned_boundaries_whatever_the_write_sizes() {
        let len = 3 * INDEX_CHUNK_LEN as usize + 1234;
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
        let mut h = ChunkHasher::default();
        for piece in bytes.chunks(100_003) {
            h.update(piece);
        }
        let got = h.finish();
        let want: Vec<ContentHash> = bytes.chunks(INDEX_CHUNK_LEN as usize).map(ContentHash::of).collect();
        assert_eq!(got, want);
        assert_eq!(got.len() as u64, chunk_count(len as u64));
    }

    #[test]
    fn a_sealed_index_is_read_back_and_a_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let blob = ContentHash([9; 32]);
        let size = 2 * INDEX_CHUNK_LEN + 5;
        let hashes = vec![ContentHash([1; 32]), ContentHash([2; 32]), ContentHash([3; 32])];
        index(dir.path()).write(&blob, size, &hashes);
        let idx = index(dir.path());
        assert_eq!(idx.chunk_hash(&blob, size, 2), Some(ContentHash([3; 32])));
        assert_eq!(idx.chunk_hash(&blob, size, 3), None);
        // Another size means another chunk count: not this index.
        assert_eq!(index(dir.path()).chunk_hash(&blob, size + INDEX_CHUNK_LEN, 0), None);

        // A flipped bit anywhere breaks the seal.
        let path = idx.path_of(&blob);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(index(dir.path()).chunk_hash(&blob, size, 1), None);
        // A count that does not fit the size is never written.
        let other = ContentHash([8; 32]);
        index(dir.path()).write(&other, size, &hashes[..2]);
        assert!(!index(dir.path()).path_of(&other).exists());
    }
}
