//! The free-space guard: a node refuses *new* work (a submission, a case offered by a
//! child) while its data directory has less than [`RESERVE_BYTES`] free beyond what
//! the new case needs, with a clear "disk full" error, so that the space left stays
//! for the work it already acknowledged (custody records, receipts, reports, audit
//! entries, resumed transfers). Offers are refused with `Busy`, which the child's core
//! retries with backoff: the case waits at the child and is offered again when space
//! returns.
//!
//! It only reads the file system's free-space figure (`statvfs`); it never deletes or
//! reserves anything, and it decides nothing about routing (that stays in `tiers`).
//! If another process takes the last byte anyway, a failed store write still stops
//! the daemon before anything unsaved is sent (see `daemon::drain`).

use std::path::Path;

/// Space kept free for work already acknowledged: 64 MiB.
pub const RESERVE_BYTES: u64 = 64 << 20;

/// Bytes available to this process on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// `Ok` if `dir` has room for `need` more bytes plus the reserve; otherwise the
/// "disk full" message given to whoever asked for the new work. A directory whose
/// free space cannot be read is not refused here (the store's own errors apply).
pub fn check(dir: &Path, need: u64) -> Result<(), String> {
    match free_bytes(dir) {
        Ok(free) => check_free(dir, free, need),
        Err(_) => Ok(()),
    }
}

fn check_free(dir: &Path, free: u64, need: u64) -> Result<(), String> {
    let want = need.saturating_add(RESERVE_BYTES);
    if free >= want {
        return Ok(());
    }
    Err(format!(
        "disk full: {} has {} MiB free, below the {} MiB needed ({} MiB for this case and {} MiB kept for \
         cases already accepted); new cases are refused until space is freed",
        dir.display(),
        free >> 20,
        want.div_ceil(1 << 20),
        need.div_ceil(1 << 20),
        RESERVE_BYTES >> 20
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_below_need_plus_reserve_and_says_disk_full() {
        let dir = Path::new("/data");
        assert!(check_free(dir, RESERVE_BYTES + 10, 10).is_ok());
        let err = check_free(dir, RESERVE_BYTES + 9, 10).unwrap_err();
        assert!(err.starts_with("disk full: /data has 64 MiB free"), "{err}");
        assert!(check_free(dir, 0, 0).unwrap_err().contains("new cases are refused"));
        assert!(check_free(dir, u64::MAX - 1, u64::MAX).is_err(), "saturates, no overflow");
    }

    #[test]
    fn reads_the_free_space_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }
}
