//! The content-addressed blob directory: every attachment a node holds, stored once
//! under the content hash (BLAKE3, ADR 0012) of its bytes.
//!
//! Layout under the data directory given to [`BlobStore::open`]:
//!
//! ```text
//! objects/ab/cdef…   complete, verified blobs (hash in hex, split after two digits)
//! partial/abcdef…    a blob being received, its bytes so far (the resume point)
//! partial/import-…   a file being imported, before its hash is known
//! chunks/abcdef…     the blob's chunk hash index (see [`crate::chunk_index`])
//! ```
//!
//! Architecture invariants:
//! - A file appears under `objects/` only by an atomic rename, after its whole
//!   content was hashed and matched the name, and after it was fsynced — or, for a
//!   small blob received from a peer, after its bytes were committed to the store's
//!   blob journal (ADR 0010, [`BlobStore::install_journaled`]): such a file is made
//!   durable later ([`BlobStore::sync_objects`]) and, until then, repaired from the
//!   journal on start ([`BlobStore::restore_journaled`]) before anything reads it.
//!   A blob under `objects/` is therefore complete and correct once the node runs; a
//!   crash leaves at most a partial file or a stray import file behind, never a bad
//!   object that nothing repairs.
//! - Objects are immutable: nothing here writes to or truncates a file under
//!   `objects/`.
//! - Memory is bounded by one copy buffer ([`COPY_BUF_LEN`]) or one chunk
//!   ([`CHUNK_LEN_MAX`]) whatever the size of a blob; a [`PartialWriter`] adds its
//!   queue of at most [`WRITE_QUEUE_DEPTH`] chunks.
//! - Writes to one partial blob are serialized, so an append always lands exactly at
//!   the resume point.
//! - Partial files are not fsynced chunk by chunk. A [`PartialWriter`] starts a
//!   background `fdatasync` every [`SYNC_EVERY`] bytes only so that the final fsync is
//!   short. After a crash a partial file may end in a damaged or missing tail; the
//!   resume re-hashes whatever is on disk, so such damage is caught by the whole-file
//!   check when the transfer ends, the partial file is deleted, and that transfer
//!   starts over. Nothing unverified or unsynced ever reaches `objects/`.
//!
//! This module must never decide who may read a blob (that is the caller's job) and
//! never touch the network.

use crate::chunk_index::{ChunkHasher, ChunkIndexes, INDEX_CHUNK_LEN};
use federation_proto::codec::CHUNK_LEN_MAX;
use federation_proto::{ContentHash, ContentHasher};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Size of the buffer used to stream files through the content hash and into the store.
pub const COPY_BUF_LEN: usize = 1024 * 1024;
/// A [`PartialWriter`] starts a background `fdatasync` of its file each time this many
/// bytes were written since the last one started (and that one has ended), so that
/// dirty pages go to disk while the transfer runs and the final fsync is short.
pub const SYNC_EVERY: u64 = 16 * 1024 * 1024;
/// Chunks queued between [`PartialWriter::append`] and the thread writing them.
pub const WRITE_QUEUE_DEPTH: usize = 4;
/// [`BlobStore::sync_objects`] pauses this long after each flush: it runs in the
/// background while custody commits wait on their own flush, and a batch of ~140
/// flushes back to back (a file and a directory per blob) kept the disk's queue
/// busy so that a commit's flush waited behind several of them (issue #4: per-hop
/// p99). With the pauses a commit waits behind one at most; a batch of
/// [`crate::daemon::JOURNAL_SYNC_BATCH_MAX`] blobs takes at most ~0.5 s longer.
pub const SYNC_GAP: std::time::Duration = std::time::Duration::from_millis(1);

/// The first line of `FORMAT` in a blob directory: its objects are named by the
/// BLAKE3 content hash. Directories written before ADR 0012 (SHA-256 names) have no
/// such file, and a store that finds their objects refuses to open instead of
/// serving files under names that no longer match their bytes.
pub const BLOB_FORMAT: &str = "telemed-blobs 2 blake3";

/// What can go wrong with the blob directory, grouped by cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    // --- content: whoever supplied the bytes is at fault ------------------------------
    /// The bytes do not hash to the name they were stored under. The partial file
    /// has been deleted.
    #[error("content of {expected:?} hashes to {actual:?}; the received bytes were discarded")]
    HashMismatch { expected: ContentHash, actual: ContentHash },

    // --- misuse: a request that does not fit the blob ---------------------------------
    /// An append not at the resume point (the bytes already received).
    #[error("append to {hash:?} at offset {offset}, but the resume point is {expected}")]
    WrongOffset { hash: ContentHash, offset: u64, expected: u64 },
    /// A byte range outside the blob.
    #[error("range {offset}+{len} lies outside {hash:?} of {size} bytes")]
    RangeOutOfBounds { hash: ContentHash, offset: u64, len: u32, size: u64 },
    /// No complete blob with this hash is stored here.
    #[error("no blob {hash:?} in the store")]
    NotFound { hash: ContentHash },
    /// `finish` was called with a size other than the bytes received.
    #[error("{hash:?} has {have} bytes received, not the {size} expected")]
    Incomplete { hash: ContentHash, have: u64, size: u64 },

    // --- local I/O ---------------------------------------------------------------------
    /// The directory's `FORMAT` file is missing (with objects present) or names
    /// another layout: its objects are not named by this version's content hash.
    #[error(
        "{}: {found}; this node names attachments by their BLAKE3 hash ({BLOB_FORMAT:?}, ADR 0012) and cannot read this blob directory: start from an empty data directory, or re-import its files",
        path.display()
    )]
    Format { path: PathBuf, found: String },
    /// The disk (or the user's quota) is full. Received bytes are kept; the transfer
    /// resumes once space is freed.
    #[error(
        "disk full while {op} {}: free space in the data directory; received bytes are kept and the transfer resumes",
        path.display()
    )]
    DiskFull { op: &'static str, path: PathBuf },
    /// Any other I/O failure on the local disk.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl BlobError {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BlobError {
        move |source| {
            if matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) {
                BlobError::DiskFull { op, path: path.to_owned() }
            } else {
                BlobError::Io { op, path: path.to_owned(), source }
            }
        }
    }
}

/// The blob directory. Cheap to clone; clones share the per-blob write locks.
#[derive(Debug, Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    objects: PathBuf,
    partial: PathBuf,
    /// Serializes writes (append, finish, discard) to one partial blob.
    writers: KeyedLocks,
    /// Serializes whole transfers of one blob (see [`BlobStore::lock_transfer`]).
    transfers: KeyedLocks,
    /// Chunk hashes of complete blobs, so serving a chunk needs no hashing.
    indexes: ChunkIndexes,
}

impl BlobStore {
    /// Opens (creating if needed) the blob directory `dir`, with `dir/objects` and
    /// `dir/partial` inside. Refuses ([`BlobError::Format`]) a directory whose
    /// `FORMAT` file names another layout, or that holds objects and no `FORMAT`.
    pub fn open(dir: &Path) -> Result<BlobStore, BlobError> {
        let objects = dir.join("objects");
        let partial = dir.join("partial");
        let chunks = dir.join("chunks");
        Self::check_format(dir, &objects)?;
        for d in [&objects, &partial, &chunks] {
            fs::create_dir_all(d).map_err(BlobError::io("creating", d))?;
        }
        Ok(BlobStore {
            inner: Arc::new(Inner {
                objects,
                partial,
                writers: KeyedLocks::default(),
                transfers: KeyedLocks::default(),
                indexes: ChunkIndexes::new(chunks),
            }),
        })
    }

    fn check_format(dir: &Path, objects: &Path) -> Result<(), BlobError> {
        let path = dir.join("FORMAT");
        match fs::read_to_string(&path) {
            Ok(text) => match text.lines().next() {
                Some(BLOB_FORMAT) => Ok(()),
                first => Err(BlobError::Format { path, found: format!("it says {:?}", first.unwrap_or("")) }),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let holds_objects = match fs::read_dir(objects) {
                    Ok(mut entries) => entries.next().is_some(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                    Err(e) => return Err(BlobError::io("listing", objects)(e)),
                };
                if holds_objects {
                    return Err(BlobError::Format {
                        path,
                        found: "missing, and objects/ holds files written before it existed (SHA-256 names)".into(),
                    });
                }
                fs::create_dir_all(dir).map_err(BlobError::io("creating", dir))?;
                fs::write(&path, format!("{BLOB_FORMAT}\n")).map_err(BlobError::io("writing", &path))
            }
            Err(e) => Err(BlobError::io("reading", &path)(e)),
        }
    }

    /// Where the complete blob `hash` is (or would be) stored.
    pub fn path_of(&self, hash: &ContentHash) -> PathBuf {
        let hex = hash.to_string();
        self.inner.objects.join(&hex[..2]).join(&hex[2..])
    }

    /// Where the bytes received so far of the incomplete blob `hash` are kept.
    pub(crate) fn partial_path(&self, hash: &ContentHash) -> PathBuf {
        self.inner.partial.join(hash.to_string())
    }

    /// Whether the complete, verified blob `hash` is stored here. Partial blobs do
    /// not count.
    pub fn contains(&self, hash: &ContentHash) -> bool {
        self.path_of(hash).is_file()
    }

    /// Size in bytes of the complete blob `hash`.
    pub async fn object_len(&self, hash: &ContentHash) -> Result<u64, BlobError> {
        let path = self.path_of(hash);
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(m.len()),
            Ok(_) => Err(BlobError::NotFound { hash: *hash }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BlobError::NotFound { hash: *hash }),
            Err(e) => Err(BlobError::io("reading metadata of", &path)(e)),
        }
    }

    /// Bytes already received of the incomplete blob `hash`: the offset to resume
    /// from. 0 when nothing was received (or the blob is complete).
    pub async fn partial_len(&self, hash: &ContentHash) -> u64 {
        tokio::fs::metadata(self.partial_path(hash)).await.map(|m| m.len()).unwrap_or(0)
    }

    /// Imports a local file: streams it through the content hash into a temporary file, fsyncs
    /// it and renames it into place. Idempotent: importing the same content twice
    /// stores it once. Returns the hash and size.
    pub async fn import_file(&self, path: &Path) -> Result<(ContentHash, u64), BlobError> {
        let store = self.clone();
        let path = path.to_owned();
        blocking(move || {
            let mut src = File::open(&path).map_err(BlobError::io("opening", &path))?;
            store.import_blocking(|buf| src.read(buf).map_err(BlobError::io("reading", &path)))
        })
        .await
    }

    /// Imports bytes held in memory (small attachments, tests). Idempotent.
    pub async fn import_bytes(&self, bytes: &[u8]) -> Result<(ContentHash, u64), BlobError> {
        let store = self.clone();
        let bytes = bytes.to_vec();
        blocking(move || store.import_blocking(read_from(&bytes))).await
    }

    fn import_blocking(
        &self,
        mut read: impl FnMut(&mut [u8]) -> Result<usize, BlobError>,
    ) -> Result<(ContentHash, u64), BlobError> {
        let tmp = self.inner.partial.join(format!("import-{:016x}.tmp", rand::random::<u64>()));
        let result = (|| {
            let mut out = File::create_new(&tmp).map_err(BlobError::io("creating", &tmp))?;
            let mut hasher = ContentHasher::new();
            let mut chunks = ChunkHasher::default();
            let mut buf = vec![0u8; COPY_BUF_LEN];
            let mut size = 0u64;
            loop {
                let n = read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                chunks.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(BlobError::io("writing", &tmp))?;
                size += n as u64;
            }
            out.sync_all().map_err(BlobError::io("syncing", &tmp))?;
            let hash = hasher.finalize();
            self.install(&tmp, &hash)?;
            self.inner.indexes.write(&hash, size, &chunks.finish());
            Ok((hash, size))
        })();
        // On success the file was renamed away (or was a duplicate); either way, gone.
        let _ = fs::remove_file(&tmp);
        result
    }

    /// Moves the verified, synced file `from` into `objects/` under `hash` and syncs
    /// the directories. If the object already exists, `from` is removed instead.
    fn install(&self, from: &Path, hash: &ContentHash) -> Result<(), BlobError> {
        let to = self.path_of(hash);
        if to.is_file() {
            return fs::remove_file(from).map_err(BlobError::io("removing", from));
        }
        let dir = to.parent().expect("objects/ab/… has a parent");
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(BlobError::io("creating", dir))?;
            sync_dir(&self.inner.objects)?;
        }
        fs::rename(from, &to).map_err(BlobError::io("renaming into", &to))?;
        sync_dir(dir)
    }

    /// Writes small blobs whose bytes the store's blob journal already holds durably
    /// (ADR 0010) into `objects/`, by a temporary file and a rename, **without
    /// fsync**: the journal is the durable copy until [`BlobStore::sync_objects`]
    /// has run, and [`BlobStore::restore_journaled`] repairs the file after a crash.
    /// The caller has checked that `bytes` hash to `hash`. Idempotent.
    pub async fn install_journaled(&self, blobs: Vec<(ContentHash, Arc<Vec<u8>>)>) -> Result<(), BlobError> {
        let store = self.clone();
        blocking(move || blobs.iter().try_for_each(|(hash, bytes)| store.install_journaled_blocking(*hash, bytes)))
            .await
    }

    fn install_journaled_blocking(&self, hash: ContentHash, bytes: &[u8]) -> Result<(), BlobError> {
        let store = self;
        {
            debug_assert_eq!(ContentHash::of(bytes), hash);
            let to = store.path_of(&hash);
            if to.is_file() {
                return Ok(());
            }
            let tmp = store.inner.partial.join(format!("journaled-{:016x}.tmp", rand::random::<u64>()));
            let written = (|| {
                fs::write(&tmp, bytes).map_err(BlobError::io("writing", &tmp))?;
                let dir = to.parent().expect("objects/ab/… has a parent");
                fs::create_dir_all(dir).map_err(BlobError::io("creating", dir))?;
                fs::rename(&tmp, &to).map_err(BlobError::io("renaming into", &to))
            })();
            if written.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            written?;
            if bytes.len() as u64 > INDEX_CHUNK_LEN {
                let mut chunks = ChunkHasher::default();
                chunks.update(bytes);
                store.inner.indexes.write(&hash, bytes.len() as u64, &chunks.finish());
            }
            Ok(())
        }
    }

    /// Makes the files of `hashes` (installed by [`BlobStore::install_journaled`])
    /// durable: fsyncs each file and its directory entries, one at a time with
    /// [`SYNC_GAP`] between. After it returns `Ok`, their journal rows may be dropped.
    pub async fn sync_objects(&self, hashes: Vec<ContentHash>) -> Result<(), BlobError> {
        let store = self.clone();
        blocking(move || {
            let mut dirs = std::collections::BTreeSet::new();
            for hash in &hashes {
                let path = store.path_of(hash);
                File::open(&path).and_then(|f| f.sync_all()).map_err(BlobError::io("syncing", &path))?;
                dirs.insert(path.parent().expect("objects/ab/… has a parent").to_owned());
                std::thread::sleep(SYNC_GAP);
            }
            // The `objects/ab` directories may be new: their own entries too.
            sync_dir(&store.inner.objects)?;
            for dir in dirs {
                sync_dir(&dir)?;
                std::thread::sleep(SYNC_GAP);
            }
            Ok(())
        })
        .await
    }

    /// After a restart: makes sure the object `hash` holds exactly `bytes` (its
    /// journaled copy) and is durable, rewriting it if it is missing or damaged (a
    /// power cut before [`BlobStore::sync_objects`]).
    pub async fn restore_journaled(&self, hash: &ContentHash, bytes: Vec<u8>) -> Result<(), BlobError> {
        let (store, hash) = (self.clone(), *hash);
        blocking(move || {
            let actual = ContentHash::of(&bytes);
            if actual != hash {
                return Err(BlobError::HashMismatch { expected: hash, actual });
            }
            let path = store.path_of(&hash);
            let good = fs::read(&path).is_ok_and(|on_disk| on_disk == bytes);
            if !good {
                tracing::warn!(%hash, "blob file missing or damaged after a restart; rewritten from the journal");
                let _ = fs::remove_file(&path);
                store.import_blocking(read_from(&bytes))?;
                return Ok(());
            }
            File::open(&path).and_then(|f| f.sync_all()).map_err(BlobError::io("syncing", &path))?;
            sync_dir(&store.inner.objects)?;
            sync_dir(path.parent().expect("objects/ab/… has a parent"))
        })
        .await
    }

    /// Reads `len` bytes (at most [`CHUNK_LEN_MAX`]) of the complete blob `hash` from
    /// `offset`; the last chunk may be shorter. A range starting at or past the end
    /// is refused (except offset 0 of an empty blob).
    pub async fn read_chunk(&self, hash: &ContentHash, offset: u64, len: u32) -> Result<Vec<u8>, BlobError> {
        let path = self.path_of(hash);
        let hash = *hash;
        blocking(move || read_chunk_blocking(&path, hash, offset, len).map(|(_, data)| data)).await
    }

    /// As [`BlobStore::read_chunk`], and also returns the blob's size and the content hash
    /// of the chunk as the blob was stored, all in one trip to the blocking pool (what
    /// a sender needs): from the chunk index when the range is an indexed chunk,
    /// otherwise hashed here.
    pub async fn read_chunk_hashed(
        &self,
        hash: &ContentHash,
        offset: u64,
        len: u32,
    ) -> Result<(u64, Vec<u8>, ContentHash), BlobError> {
        let path = self.path_of(hash);
        let (store, hash) = (self.clone(), *hash);
        blocking(move || {
            let (size, data) = read_chunk_blocking(&path, hash, offset, len)?;
            // An aligned whole chunk (or the blob's last) has its hash in the index.
            let aligned = offset.is_multiple_of(INDEX_CHUNK_LEN)
                && (data.len() as u64 == INDEX_CHUNK_LEN || offset + data.len() as u64 == size);
            let indexed = aligned.then(|| store.inner.indexes.chunk_hash(&hash, size, offset / INDEX_CHUNK_LEN));
            let chunk_hash = indexed.flatten().unwrap_or_else(|| ContentHash::of(&data));
            Ok((size, data, chunk_hash))
        })
        .await
    }

    /// Appends received bytes to the incomplete blob `hash`. `offset` must be the
    /// resume point ([`BlobStore::partial_len`]); anything else is refused and
    /// nothing is written. Not fsynced: [`BlobStore::finish`] syncs, and verifies the
    /// whole content, so bytes lost or torn by a power cut are caught there.
    pub async fn append_chunk(&self, hash: &ContentHash, offset: u64, data: &[u8]) -> Result<(), BlobError> {
        let _guard = self.inner.writers.lock(*hash).await;
        let path = self.partial_path(hash);
        let hash = *hash;
        let data = data.to_vec();
        blocking(move || {
            let mut file =
                OpenOptions::new().create(true).append(true).open(&path).map_err(BlobError::io("opening", &path))?;
            let have = file.metadata().map_err(BlobError::io("reading metadata of", &path))?.len();
            if have != offset {
                return Err(BlobError::WrongOffset { hash, offset, expected: have });
            }
            if let Err(e) = file.write_all(&data) {
                // Cut a torn write back to the resume point so the next append fits.
                let _ = file.set_len(have);
                return Err(BlobError::io("writing", &path)(e));
            }
            Ok(())
        })
        .await
    }

    /// Completes the incomplete blob `hash` of `size` bytes: streams it through
    /// the content hash; on a mismatch deletes it and returns [`BlobError::HashMismatch`];
    /// otherwise fsyncs it, renames it into `objects/` and fsyncs the directory.
    /// Idempotent once the object exists.
    pub async fn finish(&self, hash: &ContentHash, size: u64) -> Result<(), BlobError> {
        let _guard = self.inner.writers.lock(*hash).await;
        let store = self.clone();
        let hash = *hash;
        blocking(move || {
            let path = store.partial_path(&hash);
            if store.contains(&hash) {
                let _ = fs::remove_file(&path);
                return Ok(());
            }
            let mut file = match File::open(&path) {
                Ok(f) => f,
                // An empty blob needs no bytes received.
                Err(e) if e.kind() == io::ErrorKind::NotFound && size == 0 => {
                    let mut create = OpenOptions::new();
                    create.read(true).write(true).create(true);
                    create.open(&path).map_err(BlobError::io("creating", &path))?
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(BlobError::Incomplete { hash, have: 0, size });
                }
                Err(e) => return Err(BlobError::io("opening", &path)(e)),
            };
            let have = file.metadata().map_err(BlobError::io("reading metadata of", &path))?.len();
            if have != size {
                return Err(BlobError::Incomplete { hash, have, size });
            }
            let actual = hash_stream(&mut file).map_err(BlobError::io("reading", &path))?;
            if actual != hash {
                fs::remove_file(&path).map_err(BlobError::io("removing", &path))?;
                return Err(BlobError::HashMismatch { expected: hash, actual });
            }
            file.sync_all().map_err(BlobError::io("syncing", &path))?;
            drop(file);
            store.install(&path, &hash)
        })
        .await
    }

    /// Opens the incomplete blob `hash` of `size` bytes for streaming appends with a
    /// running whole-file content hash (see [`PartialWriter`]). Bytes already received (a
    /// resumed transfer) are hashed once from disk, through one [`COPY_BUF_LEN`]
    /// buffer, before this returns; a partial file longer than `size` is emptied
    /// first. Holds the blob's write lock until the writer and its disk thread are
    /// done, so no other append, finish or discard of `hash` interleaves.
    pub async fn partial_writer(&self, hash: &ContentHash, size: u64) -> Result<PartialWriter, BlobError> {
        let guard = self.inner.writers.lock(*hash).await;
        let (chunks_tx, chunks_rx) = mpsc::channel(WRITE_QUEUE_DEPTH);
        let (opened_tx, opened_rx) = oneshot::channel();
        let (store, hash) = (self.clone(), *hash);
        let worker = tokio::task::spawn_blocking(move || {
            let state = WriterState::open(&store, hash, size, guard)?;
            let _ = opened_tx.send(state.len);
            state.run(chunks_rx)
        });
        let mut writer = PartialWriter {
            store: self.clone(),
            hash,
            size,
            resumed_at: 0,
            next: 0,
            chunks: None,
            worker: Some(worker),
            chunk_hashes: None,
        };
        match opened_rx.await {
            Ok(len) => {
                (writer.resumed_at, writer.next, writer.chunks) = (len, len, Some(chunks_tx));
                // The index can be built from verified chunk hashes only from offset 0.
                writer.chunk_hashes = (len == 0).then(Vec::new);
                Ok(writer)
            }
            // Opening failed: the worker has ended with the reason.
            Err(_) => Err(writer.join().await.err().unwrap_or_else(|| worker_gone(&hash))),
        }
    }

    /// Deletes whatever was received of the incomplete blob `hash` (e.g. a partial
    /// file longer than the attachment can be).
    pub async fn discard_partial(&self, hash: &ContentHash) -> Result<(), BlobError> {
        let _guard = self.inner.writers.lock(*hash).await;
        let path = self.partial_path(hash);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(BlobError::io("removing", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Waits until no other transfer of `hash` is running in this process, and
    /// holds that exclusivity until the returned guard is dropped. Two fetches of the
    /// same blob (two cases sharing an attachment) then run one after the other, and
    /// the second finds the blob complete.
    pub async fn lock_transfer(&self, hash: &ContentHash) -> TransferLock {
        TransferLock { _guard: self.inner.transfers.lock(*hash).await }
    }
}

/// Exclusive right to transfer one blob; see [`BlobStore::lock_transfer`].
#[derive(Debug)]
pub struct TransferLock {
    _guard: KeyedGuard,
}

/// Streams the chunks of one incomplete blob, in order, into its partial file while
/// keeping the content hash of the whole file so far, so that [`PartialWriter::finish`]
/// needs no second read of the file. Made by [`BlobStore::partial_writer`].
///
/// Hashing and writing run on a blocking thread fed through a queue of at most
/// [`WRITE_QUEUE_DEPTH`] chunks, so the caller keeps receiving while the disk works;
/// an error of that thread is returned by the next call. Every [`SYNC_EVERY`] bytes a
/// background `fdatasync` is started, so that little is left to sync at the end.
///
/// Dropping a writer without [`finish`](PartialWriter::finish) or
/// [`close`](PartialWriter::close) still writes the queued chunks (in the background)
/// and keeps them as the resume point; the blob's write lock is released only after.
#[derive(Debug)]
pub struct PartialWriter {
    store: BlobStore,
    hash: ContentHash,
    size: u64,
    resumed_at: u64,
    /// Offset of the next append: bytes on disk plus bytes queued.
    next: u64,
    chunks: Option<mpsc::Sender<Vec<u8>>>,
    worker: Option<tokio::task::JoinHandle<Result<WriterState, BlobError>>>,
    /// The verified hashes of the aligned chunks appended so far, for the blob's
    /// chunk index; `None` once any append did not fit (resumed, unaligned, unknown).
    chunk_hashes: Option<Vec<ContentHash>>,
}

impl PartialWriter {
    /// The blob being written.
    pub fn hash(&self) -> ContentHash {
        self.hash
    }

    /// Bytes that were already on disk when the writer was opened (the resume point).
    pub fn resumed_at(&self) -> u64 {
        self.resumed_at
    }

    /// Offset of the next append: the bytes received so far, written or queued.
    pub fn len(&self) -> u64 {
        self.next
    }

    /// Whether no bytes have been received at all.
    pub fn is_empty(&self) -> bool {
        self.next == 0
    }

    /// Appends `data` at `offset`, which must be [`PartialWriter::len`], and at most
    /// `size` in all; anything else is refused and nothing is written. Returns once
    /// the chunk is queued; a failure of an earlier write is returned here (and ends
    /// the writer).
    pub async fn append(&mut self, offset: u64, data: Vec<u8>) -> Result<(), BlobError> {
        self.chunk_hashes = None;
        self.queue(offset, data).await
    }

    /// [`PartialWriter::append`] of a chunk whose content hash the caller has checked to be
    /// `chunk_hash`: aligned whole chunks from offset 0 on are remembered, so that
    /// the finished blob gets its chunk index without hashing it again.
    pub async fn append_verified(
        &mut self,
        offset: u64,
        data: Vec<u8>,
        chunk_hash: ContentHash,
    ) -> Result<(), BlobError> {
        let whole = data.len() as u64 == INDEX_CHUNK_LEN || offset + data.len() as u64 == self.size;
        let next_index = self.chunk_hashes.as_ref().map(|h| h.len() as u64);
        if whole && next_index.is_some_and(|i| i * INDEX_CHUNK_LEN == offset) {
            debug_assert_eq!(ContentHash::of(&data), chunk_hash);
            self.queue(offset, data).await?;
            if let Some(hashes) = &mut self.chunk_hashes {
                hashes.push(chunk_hash);
            }
            Ok(())
        } else {
            self.append(offset, data).await
        }
    }

    async fn queue(&mut self, offset: u64, data: Vec<u8>) -> Result<(), BlobError> {
        if offset != self.next || self.size - self.next < data.len() as u64 {
            return Err(BlobError::WrongOffset { hash: self.hash, offset, expected: self.next });
        }
        let n = data.len() as u64;
        let Some(chunks) = &self.chunks else { return Err(worker_gone(&self.hash)) };
        if chunks.send(data).await.is_err() {
            // The disk thread stopped: it tells why.
            self.chunks = None;
            return Err(self.join().await.err().unwrap_or_else(|| worker_gone(&self.hash)));
        }
        self.next += n;
        Ok(())
    }

    /// Writes what is queued and completes the blob: refuses with
    /// [`BlobError::Incomplete`] unless exactly `size` bytes were received; on a hash
    /// mismatch deletes the partial file and returns [`BlobError::HashMismatch`];
    /// otherwise fsyncs the file, renames it into `objects/` and fsyncs the directory.
    /// A failed fsync (now or in the background) deletes the partial file: after a
    /// write-back error the cached bytes can no longer be trusted to reach the disk.
    pub async fn finish(mut self) -> Result<(), BlobError> {
        let state = self.join().await?;
        let (store, hash, size) = (self.store.clone(), self.hash, self.size);
        let chunk_hashes = self.chunk_hashes.take();
        blocking(move || {
            state.finish(&store, hash, size)?;
            if let Some(hashes) = chunk_hashes {
                store.inner.indexes.write(&hash, size, &hashes);
            }
            Ok(())
        })
        .await
    }

    /// Writes what is queued and stops, keeping the bytes on disk as the resume point
    /// (the transfer failed or is paused). Returns the error of the disk thread, if
    /// any.
    pub async fn close(mut self) -> Result<(), BlobError> {
        self.join().await.map(drop)
    }

    /// Closes the queue and waits for the disk thread to write it and end.
    async fn join(&mut self) -> Result<WriterState, BlobError> {
        self.chunks = None;
        let Some(worker) = self.worker.take() else { return Err(worker_gone(&self.hash)) };
        match worker.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(BlobError::Io { op: "running file task", path: PathBuf::new(), source: io::Error::other(e) }),
        }
    }
}

fn worker_gone(hash: &ContentHash) -> BlobError {
    BlobError::Io {
        op: "writing (writer already closed)",
        path: PathBuf::from(hash.to_string()),
        source: io::Error::other("the partial writer's disk thread has ended"),
    }
}

/// The disk side of a [`PartialWriter`]: the open partial file, the content hash of its
/// bytes so far, and the blob's write lock.
#[derive(Debug)]
struct WriterState {
    path: PathBuf,
    file: Arc<File>,
    hasher: ContentHasher,
    /// Bytes in the file, all of them hashed.
    len: u64,
    sync: BackgroundSync,
    _guard: KeyedGuard,
}

impl WriterState {
    /// Opens (creating) the partial file of `hash` and hashes the bytes already in it.
    fn open(store: &BlobStore, hash: ContentHash, size: u64, guard: KeyedGuard) -> Result<WriterState, BlobError> {
        let path = store.partial_path(&hash);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(BlobError::io("opening", &path))?;
        let mut have = file.metadata().map_err(BlobError::io("reading metadata of", &path))?.len();
        if have > size {
            // Cannot be a prefix of this blob: start over.
            file.set_len(0).map_err(BlobError::io("truncating", &path))?;
            have = 0;
        }
        // The running hash must cover what is on disk, not what we think we wrote
        // before a restart: re-hash the prefix once.
        let mut hasher = ContentHasher::new();
        let mut len = 0u64;
        if have > 0 {
            let mut buf = vec![0u8; COPY_BUF_LEN.min(have as usize)];
            let mut prefix = (&file).take(have);
            loop {
                let n = match prefix.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(BlobError::io("reading", &path)(e)),
                };
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            if len != have {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, format!("{len} of {have} bytes readable"));
                return Err(BlobError::io("re-hashing", &path)(e));
            }
        }
        let file = Arc::new(file);
        let sync = BackgroundSync::new(file.clone(), len);
        Ok(WriterState { path, file, hasher, len, sync, _guard: guard })
    }

    /// Hashes and writes chunks until the queue is closed and drained.
    fn run(mut self, mut chunks: mpsc::Receiver<Vec<u8>>) -> Result<WriterState, BlobError> {
        while let Some(data) = chunks.blocking_recv() {
            if let Err(e) = (&*self.file).write_all(&data) {
                // Cut a torn write back to the resume point, which the hash covers.
                let _ = self.file.set_len(self.len);
                return Err(BlobError::io("writing", &self.path)(e));
            }
            self.hasher.update(&data);
            self.len += data.len() as u64;
            self.sync.maybe_start(self.len);
        }
        Ok(self)
    }

    /// See [`PartialWriter::finish`].
    fn finish(self, store: &BlobStore, hash: ContentHash, size: u64) -> Result<(), BlobError> {
        let WriterState { path, file, hasher, len, sync, _guard } = self;
        if let Err(e) = sync.wait() {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(BlobError::io("syncing (in the background)", &path)(e));
        }
        if len != size {
            return Err(BlobError::Incomplete { hash, have: len, size });
        }
        let actual = hasher.finalize();
        if actual != hash {
            drop(file);
            fs::remove_file(&path).map_err(BlobError::io("removing", &path))?;
            return Err(BlobError::HashMismatch { expected: hash, actual });
        }
        if let Err(e) = file.sync_all() {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(BlobError::io("syncing", &path)(e));
        }
        drop(file);
        store.install(&path, &hash)
    }
}

/// At most one `fdatasync` of a partial file running on its own thread. Its error is
/// kept for [`BackgroundSync::wait`]: the kernel reports a write-back error to one
/// fsync of an open file only, so the final fsync might not see it again.
#[derive(Debug)]
struct BackgroundSync {
    file: Arc<File>,
    running: Option<std::thread::JoinHandle<io::Result<()>>>,
    /// File length when the last sync started.
    started_at: u64,
    error: Option<io::Error>,
}

impl BackgroundSync {
    fn new(file: Arc<File>, len: u64) -> BackgroundSync {
        BackgroundSync { file, running: None, started_at: len, error: None }
    }

    /// Starts a sync if [`SYNC_EVERY`] bytes were written since the last one started
    /// and it has ended.
    fn maybe_start(&mut self, len: u64) {
        if len - self.started_at < SYNC_EVERY || self.running.as_ref().is_some_and(|r| !r.is_finished()) {
            return;
        }
        self.reap();
        let file = self.file.clone();
        let spawned = std::thread::Builder::new().name("blob-sync".into()).spawn(move || file.sync_data());
        // No thread to spare: skip this one; the final fsync covers everything.
        if let Ok(handle) = spawned {
            self.running = Some(handle);
            self.started_at = len;
        }
    }

    fn reap(&mut self) {
        if let Some(handle) = self.running.take() {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.error.get_or_insert(e);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    }

    /// Waits for a running sync; the first error any of them met.
    fn wait(mut self) -> io::Result<()> {
        self.reap();
        self.error.map_or(Ok(()), Err)
    }
}

/// A `read` for [`BlobStore::import_blocking`] that hands out `bytes` in order.
fn read_from(bytes: &[u8]) -> impl FnMut(&mut [u8]) -> Result<usize, BlobError> + '_ {
    let mut rest = bytes;
    move |buf| {
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        Ok(n)
    }
}

/// The content hash of everything from the reader's position on, through a bounded buffer.
fn hash_stream(reader: &mut impl Read) -> io::Result<ContentHash> {
    let mut hasher = ContentHasher::new();
    let mut buf = vec![0u8; COPY_BUF_LEN];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize())
}

/// Reads a range of the object at `path`; returns the object's size and the bytes.
fn read_chunk_blocking(path: &Path, hash: ContentHash, offset: u64, len: u32) -> Result<(u64, Vec<u8>), BlobError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BlobError::NotFound { hash }),
        Err(e) => return Err(BlobError::io("opening", path)(e)),
    };
    let size = file.metadata().map_err(BlobError::io("reading metadata of", path))?.len();
    let in_range = offset < size || (offset == 0 && size == 0);
    if !in_range || len == 0 {
        return Err(BlobError::RangeOutOfBounds { hash, offset, len, size });
    }
    let n = u64::from(len.min(CHUNK_LEN_MAX)).min(size - offset);
    // Read into spare capacity: the buffer is not zeroed first.
    let mut data = Vec::with_capacity(n as usize);
    file.seek(SeekFrom::Start(offset)).map_err(BlobError::io("seeking in", path))?;
    let read = (&mut file).take(n).read_to_end(&mut data).map_err(BlobError::io("reading", path))?;
    if read as u64 != n {
        let e = io::Error::new(io::ErrorKind::UnexpectedEof, format!("{read} of {n} bytes readable"));
        return Err(BlobError::io("reading", path)(e));
    }
    Ok((size, data))
}

/// Makes a rename or creation inside `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(BlobError::io("syncing directory", dir))
}

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, BlobError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(BlobError::Io { op: "running file task", path: PathBuf::new(), source: io::Error::other(e) }),
    }
}

/// One async mutex per key, created on demand and dropped with its last user, so the
/// map holds only keys in use.
#[derive(Debug, Default)]
struct KeyedLocks {
    locks: Arc<Mutex<HashMap<ContentHash, Arc<tokio::sync::Mutex<()>>>>>,
}

impl KeyedLocks {
    async fn lock(&self, key: ContentHash) -> KeyedGuard {
        let mutex = self.locks.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().clone();
        let guard = mutex.clone().lock_owned().await;
        KeyedGuard { map: self.locks.clone(), key, mutex, guard: Some(guard) }
    }
}

#[derive(Debug)]
struct KeyedGuard {
    map: Arc<Mutex<HashMap<ContentHash, Arc<tokio::sync::Mutex<()>>>>>,
    key: ContentHash,
    mutex: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for KeyedGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and this guard hold it: nobody else waits for this key.
        if Arc::strong_count(&self.mutex) == 2 {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    fn random_bytes(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rng().fill_bytes(&mut v);
        v
    }

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn a_directory_of_another_format_or_of_unmarked_objects_is_refused_and_left_alone() {
        // A fresh directory gets the marker, and opens again.
        let (dir, store) = store();
        let (hash, _) = store.import_bytes(b"ecg").await.unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("FORMAT")).unwrap(), format!("{BLOB_FORMAT}\n"));
        BlobStore::open(dir.path()).unwrap();

        // Objects without the marker: written before BLAKE3 names (SHA-256).
        fs::remove_file(dir.path().join("FORMAT")).unwrap();
        let err = BlobStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, BlobError::Format { .. }), "{err}");
        assert!(err.to_string().contains("SHA-256 names"), "{err}");
        assert!(!dir.path().join("FORMAT").exists(), "a refused directory gets no marker");
        assert!(store.path_of(&hash).is_file(), "and keeps its objects");

        // A marker naming another layout.
        fs::write(dir.path().join("FORMAT"), "telemed-blobs 3 something\n").unwrap();
        let err = BlobStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("\"telemed-blobs 3 something\""), "{err}");
    }

    #[tokio::test]
    async fn imported_and_received_blobs_get_a_chunk_index_that_serves_the_right_hashes() {
        let (_d, sender) = store();
        let bytes = random_bytes(2 * INDEX_CHUNK_LEN as usize + 777);
        let (hash, size) = sender.import_bytes(&bytes).await.unwrap();
        let index = sender.inner.indexes.path_of(&hash);
        assert!(index.exists(), "import writes the index");
        for (offset, len) in [
            (0, CHUNK_LEN_MAX),
            (INDEX_CHUNK_LEN, CHUNK_LEN_MAX),
            (2 * INDEX_CHUNK_LEN, CHUNK_LEN_MAX),
            (100, 5000),
            (0, 1000),
            (INDEX_CHUNK_LEN - 10, CHUNK_LEN_MAX),
        ] {
            let (total, data, chunk_hash) = sender.read_chunk_hashed(&hash, offset, len).await.unwrap();
            assert_eq!(total, size);
            assert_eq!(data, bytes[offset as usize..][..data.len()]);
            assert_eq!(chunk_hash, ContentHash::of(&data), "{offset}+{len}");
        }

        // A receiver that appends verified aligned chunks from 0 builds the same index.
        let (_r, receiver) = store();
        let mut writer = receiver.partial_writer(&hash, size).await.unwrap();
        for (i, chunk) in bytes.chunks(INDEX_CHUNK_LEN as usize).enumerate() {
            let offset = i as u64 * INDEX_CHUNK_LEN;
            writer.append_verified(offset, chunk.to_vec(), ContentHash::of(chunk)).await.unwrap();
        }
        writer.finish().await.unwrap();
        assert_eq!(std::fs::read(receiver.inner.indexes.path_of(&hash)).unwrap(), std::fs::read(&index).unwrap());

        // Unaligned appends leave no index (the sender then hashes when serving).
        let (_u, unaligned) = store();
        let mut writer = unaligned.partial_writer(&hash, size).await.unwrap();
        for (i, chunk) in bytes.chunks(1000).enumerate() {
            writer.append_verified(i as u64 * 1000, chunk.to_vec(), ContentHash::of(chunk)).await.unwrap();
        }
        writer.finish().await.unwrap();
        assert!(unaligned.contains(&hash));
        assert!(!unaligned.inner.indexes.path_of(&hash).exists());
        let (_, data, chunk_hash) = unaligned.read_chunk_hashed(&hash, 0, CHUNK_LEN_MAX).await.unwrap();
        assert_eq!(chunk_hash, ContentHash::of(&data));
    }

    #[tokio::test]
    async fn a_blob_damaged_on_disk_is_served_with_the_hash_it_was_stored_with() {
        let (_d, sender) = store();
        let bytes = random_bytes(INDEX_CHUNK_LEN as usize + 10);
        let (hash, _) = sender.import_bytes(&bytes).await.unwrap();
        let mut damaged = bytes.clone();
        damaged[5] ^= 0x10;
        std::fs::write(sender.path_of(&hash), &damaged).unwrap();
        // The receiver's per-chunk check will refuse this chunk: the index says what
        // the bytes were, not what the disk now holds.
        let (_, data, chunk_hash) = sender.read_chunk_hashed(&hash, 0, CHUNK_LEN_MAX).await.unwrap();
        assert_eq!(data, damaged[..INDEX_CHUNK_LEN as usize]);
        assert_eq!(chunk_hash, ContentHash::of(&bytes[..INDEX_CHUNK_LEN as usize]));
        assert_ne!(chunk_hash, ContentHash::of(&data));
    }

    #[tokio::test]
    async fn a_one_chunk_blob_keeps_no_index_file_and_its_chunk_hash_is_its_name() {
        let (_d, store) = store();
        let bytes = random_bytes(120_000);
        let (hash, _) = store.import_bytes(&bytes).await.unwrap();
        let journaled = ContentHash::of(b"a journaled ECG");
        store.install_journaled(vec![(journaled, Arc::new(b"a journaled ECG".to_vec()))]).await.unwrap();
        for h in [hash, journaled] {
            assert!(!store.inner.indexes.path_of(&h).exists(), "no index file for a one-chunk blob");
        }
        let (_, data, chunk_hash) = store.read_chunk_hashed(&hash, 0, CHUNK_LEN_MAX).await.unwrap();
        assert_eq!((data, chunk_hash), (bytes.clone(), hash));
        // A part of it is hashed as read.
        let (_, part, part_hash) = store.read_chunk_hashed(&hash, 0, 1000).await.unwrap();
        assert_eq!(part_hash, ContentHash::of(&part));
        // Damaged on disk: served with the name's hash, which the receiver's check refuses.
        let mut damaged = bytes.clone();
        damaged[5] ^= 0x10;
        std::fs::write(store.path_of(&hash), &damaged).unwrap();
        let (_, data, chunk_hash) = store.read_chunk_hashed(&hash, 0, CHUNK_LEN_MAX).await.unwrap();
        assert_eq!(data, damaged);
        assert_eq!(chunk_hash, hash);
        assert_ne!(chunk_hash, ContentHash::of(&data));
    }

    #[tokio::test]
    async fn import_contains_and_read_round_trip() {
        let (dir, store) = store();
        let bytes = random_bytes(3 * CHUNK_LEN_MAX as usize + 17);
        let src = dir.path().join("ecg.bin");
        std::fs::write(&src, &bytes).unwrap();

        let (hash, size) = store.import_file(&src).await.unwrap();
        assert_eq!(hash, ContentHash::of(&bytes));
        assert_eq!(size, bytes.len() as u64);
        assert!(store.contains(&hash));
        assert_eq!(std::fs::read(store.path_of(&hash)).unwrap(), bytes);
        let hex = hash.to_string();
        assert!(store.path_of(&hash).ends_with(format!("objects/{}/{}", &hex[..2], &hex[2..])));
        assert_eq!(store.object_len(&hash).await.unwrap(), size);

        let mut read = Vec::new();
        let mut offset = 0u64;
        while offset < size {
            let chunk = store.read_chunk(&hash, offset, u32::MAX).await.unwrap();
            assert!(chunk.len() <= CHUNK_LEN_MAX as usize, "len capped at CHUNK_LEN_MAX");
            offset += chunk.len() as u64;
            read.extend_from_slice(&chunk);
        }
        assert_eq!(read, bytes);
        assert_eq!(store.read_chunk(&hash, 5, 10).await.unwrap(), &bytes[5..15]);

        // Idempotent, from a file or from memory; no temporary files left behind.
        assert_eq!(store.import_file(&src).await.unwrap(), (hash, size));
        assert_eq!(store.import_bytes(&bytes).await.unwrap(), (hash, size));
        assert_eq!(std::fs::read_dir(dir.path().join("partial")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn empty_blob_round_trips() {
        let (_dir, store) = store();
        let (hash, size) = store.import_bytes(b"").await.unwrap();
        assert_eq!((hash, size), (ContentHash::of(b""), 0));
        assert!(store.contains(&hash));
        assert_eq!(store.read_chunk(&hash, 0, 10).await.unwrap(), Vec::<u8>::new());
        // And one received over the wire: no bytes at all, then finish.
        let (_dir2, other) = self::store();
        other.finish(&hash, 0).await.unwrap();
        assert!(other.contains(&hash));
    }

    #[tokio::test]
    async fn read_out_of_range_or_missing_is_refused() {
        let (_dir, store) = store();
        let (hash, size) = store.import_bytes(&random_bytes(1000)).await.unwrap();
        for (offset, len) in [(size, 1), (size + 1, 1), (u64::MAX, u32::MAX), (0, 0)] {
            let err = store.read_chunk(&hash, offset, len).await.unwrap_err();
            assert!(matches!(err, BlobError::RangeOutOfBounds { size: 1000, .. }), "{offset}+{len}: {err}");
        }
        // A range running past the end is cut at the end.
        assert_eq!(store.read_chunk(&hash, 990, 100).await.unwrap().len(), 10);
        let missing = ContentHash([9; 32]);
        assert!(matches!(store.read_chunk(&missing, 0, 1).await, Err(BlobError::NotFound { .. })));
        assert!(matches!(store.object_len(&missing).await, Err(BlobError::NotFound { .. })));
    }

    #[tokio::test]
    async fn append_at_the_resume_point_then_finish_installs_the_object() {
        let (_dir, store) = store();
        let bytes = random_bytes(100_000);
        let hash = ContentHash::of(&bytes);
        assert_eq!(store.partial_len(&hash).await, 0);
        store.append_chunk(&hash, 0, &bytes[..40_000]).await.unwrap();
        assert_eq!(store.partial_len(&hash).await, 40_000);
        assert!(!store.contains(&hash), "a partial blob is not contained");

        // Neither a gap nor an overlap is accepted, and nothing is written.
        for offset in [0, 39_999, 40_001] {
            let err = store.append_chunk(&hash, offset, &bytes[40_000..50_000]).await.unwrap_err();
            assert!(matches!(err, BlobError::WrongOffset { offset: o, expected: 40_000, .. } if o == offset), "{err}");
        }
        assert_eq!(store.partial_len(&hash).await, 40_000);
        let err = store.finish(&hash, 100_000).await.unwrap_err();
        assert!(matches!(err, BlobError::Incomplete { have: 40_000, size: 100_000, .. }), "{err}");

        store.append_chunk(&hash, 40_000, &bytes[40_000..]).await.unwrap();
        store.finish(&hash, 100_000).await.unwrap();
        assert!(store.contains(&hash));
        assert_eq!(store.partial_len(&hash).await, 0);
        assert_eq!(std::fs::read(store.path_of(&hash)).unwrap(), bytes);
        store.finish(&hash, 100_000).await.unwrap();
    }

    #[tokio::test]
    async fn finish_with_wrong_content_is_a_hash_mismatch_and_leaves_no_object() {
        let (_dir, store) = store();
        let bytes = random_bytes(10_000);
        let hash = ContentHash::of(&bytes);
        let mut tampered = bytes.clone();
        tampered[1234] ^= 1;
        store.append_chunk(&hash, 0, &tampered).await.unwrap();
        let err = store.finish(&hash, 10_000).await.unwrap_err();
        match err {
            BlobError::HashMismatch { expected, actual } => {
                assert_eq!(expected, hash);
                assert_eq!(actual, ContentHash::of(&tampered));
            }
            other => panic!("expected HashMismatch, got {other}"),
        }
        assert!(!store.contains(&hash));
        assert!(!store.path_of(&hash).exists());
        assert_eq!(store.partial_len(&hash).await, 0, "the bad partial is deleted, the next try starts over");
    }

    #[tokio::test]
    async fn concurrent_appends_to_one_blob_never_interleave() {
        let (_dir, store) = store();
        let bytes = random_bytes(64 * 1024);
        let hash = ContentHash::of(&bytes);
        // Many writers race for the same resume point: exactly one wins each round.
        for round in 0..4 {
            let offset = round * 16 * 1024;
            let chunk = &bytes[offset..offset + 16 * 1024];
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let (store, chunk) = (store.clone(), chunk.to_vec());
                    tokio::spawn(async move { store.append_chunk(&hash, offset as u64, &chunk).await })
                })
                .collect();
            let mut ok = 0;
            for t in tasks {
                ok += usize::from(t.await.unwrap().is_ok());
            }
            assert_eq!(ok, 1);
        }
        store.finish(&hash, bytes.len() as u64).await.unwrap();
        assert!(store.inner.writers.locks.lock().unwrap().is_empty(), "locks are dropped with their last user");
    }

    /// Streams `bytes` into a writer in chunks of `chunk`.
    async fn write_all(writer: &mut PartialWriter, bytes: &[u8], chunk: usize) {
        for part in bytes.chunks(chunk) {
            writer.append(writer.len(), part.to_vec()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn partial_writer_hashes_while_appending_and_installs_on_finish() {
        let (_dir, store) = store();
        let bytes = random_bytes(3 * CHUNK_LEN_MAX as usize + 999);
        let hash = ContentHash::of(&bytes);
        let size = bytes.len() as u64;
        let mut writer = store.partial_writer(&hash, size).await.unwrap();
        assert_eq!((writer.resumed_at(), writer.len()), (0, 0));
        writer.append(0, bytes[..1000].to_vec()).await.unwrap();
        // A gap, an overlap or bytes past the end are refused, and nothing is queued.
        for (offset, len) in [(999, 10), (1001, 10), (1000, bytes.len())] {
            let err = writer.append(offset, vec![0; len]).await.unwrap_err();
            assert!(matches!(err, BlobError::WrongOffset { expected: 1000, .. }), "{offset}+{len}: {err}");
        }
        write_all(&mut writer, &bytes[1000..], CHUNK_LEN_MAX as usize).await;
        assert_eq!(writer.len(), size);
        writer.finish().await.unwrap();
        assert!(store.contains(&hash));
        assert_eq!(std::fs::read(store.path_of(&hash)).unwrap(), bytes);
        assert_eq!(store.partial_len(&hash).await, 0);
        assert!(store.inner.writers.locks.lock().unwrap().is_empty(), "the write lock is released");

        // An empty blob: no bytes at all.
        let empty = ContentHash::of(b"");
        store.partial_writer(&empty, 0).await.unwrap().finish().await.unwrap();
        assert!(store.contains(&empty));
    }

    #[tokio::test]
    async fn partial_writer_finish_refuses_short_or_wrong_content() {
        let (_dir, store) = store();
        let bytes = random_bytes(100_000);
        let hash = ContentHash::of(&bytes);
        let mut writer = store.partial_writer(&hash, 100_000).await.unwrap();
        write_all(&mut writer, &bytes[..60_000], 16_384).await;
        let err = writer.finish().await.unwrap_err();
        assert!(matches!(err, BlobError::Incomplete { have: 60_000, size: 100_000, .. }), "{err}");
        assert_eq!(store.partial_len(&hash).await, 60_000, "a short blob is kept to resume");

        let mut tampered = bytes.clone();
        tampered[77_777] ^= 1;
        let mut writer = store.partial_writer(&hash, 100_000).await.unwrap();
        assert_eq!(writer.resumed_at(), 60_000);
        write_all(&mut writer, &tampered[60_000..], 16_384).await;
        match writer.finish().await.unwrap_err() {
            BlobError::HashMismatch { expected, actual } => {
                assert_eq!((expected, actual), (hash, ContentHash::of(&tampered)));
            }
            other => panic!("expected HashMismatch, got {other}"),
        }
        assert!(!store.contains(&hash));
        assert_eq!(store.partial_len(&hash).await, 0, "bad bytes are deleted");
    }

    #[tokio::test]
    async fn partial_writer_resume_rehashes_the_prefix_on_disk() {
        let (dir, store) = store();
        let bytes = random_bytes(2 * COPY_BUF_LEN + 12_345);
        let hash = ContentHash::of(&bytes);
        let size = bytes.len() as u64;
        let half = bytes.len() / 2;

        // A first writer is dropped mid-way (a cancelled transfer): its queued chunks
        // still reach the disk before the blob can be opened again.
        let mut writer = store.partial_writer(&hash, size).await.unwrap();
        write_all(&mut writer, &bytes[..half], 100_000).await;
        drop(writer);
        let writer = store.partial_writer(&hash, size).await.unwrap();
        assert_eq!(writer.resumed_at(), half as u64);
        writer.close().await.unwrap();
        let store = BlobStore::open(dir.path()).unwrap();

        // Resumed by a new process: the running hash covers the prefix read back.
        let mut writer = store.partial_writer(&hash, size).await.unwrap();
        write_all(&mut writer, &bytes[half..], 100_000).await;
        writer.finish().await.unwrap();
        assert_eq!(std::fs::read(store.path_of(&hash)).unwrap(), bytes);

        // The same, but a byte of the prefix changed on disk while nobody wrote.
        let (_dir, store) = self::store();
        let mut writer = store.partial_writer(&hash, size).await.unwrap();
        write_all(&mut writer, &bytes[..half], 100_000).await;
        writer.close().await.unwrap();
        let partial = store.partial_path(&hash);
        let mut on_disk = std::fs::read(&partial).unwrap();
        on_disk[123] ^= 0x80;
        std::fs::write(&partial, &on_disk).unwrap();
        let mut writer = store.partial_writer(&hash, size).await.unwrap();
        write_all(&mut writer, &bytes[half..], 100_000).await;
        let err = writer.finish().await.unwrap_err();
        assert!(matches!(err, BlobError::HashMismatch { expected, .. } if expected == hash), "{err}");
        assert!(!store.contains(&hash) && !store.path_of(&hash).exists());

        // A partial longer than the blob cannot be its prefix: it is emptied.
        std::fs::write(&partial, vec![0u8; bytes.len() + 1]).unwrap();
        let writer = store.partial_writer(&hash, size).await.unwrap();
        assert_eq!(writer.resumed_at(), 0);
    }

    #[tokio::test]
    async fn partial_writer_syncs_in_the_background_on_large_blobs() {
        let (_dir, store) = store();
        let bytes = random_bytes(2 * SYNC_EVERY as usize + 1);
        let hash = ContentHash::of(&bytes);
        let mut writer = store.partial_writer(&hash, bytes.len() as u64).await.unwrap();
        write_all(&mut writer, &bytes, CHUNK_LEN_MAX as usize).await;
        writer.finish().await.unwrap();
        assert_eq!(ContentHash::of(&std::fs::read(store.path_of(&hash)).unwrap()), hash);
    }

    #[test]
    fn enospc_is_reported_as_disk_full() {
        let err = BlobError::io("writing", Path::new("/data/partial/ab"))(io::Error::from_raw_os_error(28));
        assert!(matches!(err, BlobError::DiskFull { .. }), "{err}");
        assert!(err.to_string().contains("disk full while writing /data/partial/ab"), "{err}");
    }
}
