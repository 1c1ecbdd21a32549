//! Graceful shutdown: once `Running::shutdown` has returned, the node writes nothing
//! more into its data directory, even with an attachment fetch running when it was
//! called; and the bytes that fetch received are the resume point after a restart.

use certs::keys::NodeCredentials;
use certs::verify::TrustStore;
use federation_proto::{CaseId, ContentHash, Modality, Tier, Urgency};
use node::load::{COUNTY, county_plan};
use node::loadgen::PlayedChild;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Every file under `dir` with its length and modification time.
fn listing(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                out.insert(entry.path(), (meta.len(), meta.modified().unwrap()));
            }
        }
    }
    out
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_written_after_shutdown_returns_and_the_cut_fetch_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let configs = node::demo::provision(dir.path(), &county_plan(1)).unwrap();
    let county_config = configs[0].clone();
    let county = node::daemon::start(county_config.clone()).await.unwrap();
    let trust = Arc::new(TrustStore::from_root_pem(&std::fs::read_to_string(&configs[0].tls.root).unwrap()).unwrap());
    let village = |addr| {
        let creds = NodeCredentials::load(&configs[1].tls.chain, &configs[1].tls.key).unwrap();
        let (name, trust) = (configs[1].name.clone(), trust.clone());
        async move {
            PlayedChild::connect(&creds, name.as_str().into(), Tier::Village, trust, COUNTY.into(), addr).await.unwrap()
        }
    };

    // A large attachment, so that the county is still fetching it when it stops.
    let size = 32 * 1024 * 1024;
    let bytes: Arc<Vec<u8>> = Arc::new((0..size).map(|i| (i % 251) as u8 ^ (i >> 20) as u8).collect());
    let hash = ContentHash::of(&bytes);
    let case_id = CaseId(rand::random());
    let child = village(county.addr).await;
    let offer = child.make_offer(case_id, Modality::Imaging, Urgency::Routine, bytes.clone());
    child.send(&federation_proto::Message::CaseOffer(offer.clone())).await.unwrap();

    let blob_dir = county_config.blob_dir();
    let partial = blob_dir.join("partial").join(hash.to_string());
    let end = Instant::now() + Duration::from_secs(60);
    while file_len(&partial) < 1024 * 1024 {
        assert!(Instant::now() < end, "the county never started fetching");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    county.shutdown().await.unwrap();
    let at_return = listing(&county_config.data_dir);
    let received = file_len(&partial);
    assert!(
        received > 0 && received < size as u64,
        "the fetch was cut by the shutdown ({received} of {size} bytes received)"
    );
    assert!(!node::blobs::BlobStore::open(&blob_dir).unwrap().contains(&hash));

    // Nothing in the data directory changes after shutdown has returned.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = listing(&county_config.data_dir);
    assert_eq!(at_return, later, "files changed after shutdown returned");
    drop(child);

    // Restarted, the county resumes from the bytes it had and takes custody.
    let county = node::daemon::start(county_config.clone()).await.unwrap();
    let child = village(county.addr).await;
    // (A played child serves the attachments of offers it made: make one, send the old.)
    let _ = child.make_offer(CaseId(rand::random()), Modality::Imaging, Urgency::Routine, bytes.clone());
    let took = child.offer_until_receipt(offer, Duration::from_secs(120)).await;
    assert!(took.is_some(), "no custody receipt after the restart");
    let blobs = node::blobs::BlobStore::open(&blob_dir).unwrap();
    assert!(blobs.contains(&hash));
    assert_eq!(ContentHash::of(&std::fs::read(blobs.path_of(&hash)).unwrap()), hash);
    county.shutdown().await.unwrap();
}

/// A county node started from a fresh plan in `dir`, and one played village linked to it.
async fn county_with_a_village(dir: &Path) -> (node::config::Config, node::daemon::Running, PlayedChild) {
    let configs = node::demo::provision(dir, &county_plan(1)).unwrap();
    let county = node::daemon::start(configs[0].clone()).await.unwrap();
    let trust = Arc::new(TrustStore::from_root_pem(&std::fs::read_to_string(&configs[0].tls.root).unwrap()).unwrap());
    let creds = NodeCredentials::load(&configs[1].tls.chain, &configs[1].tls.key).unwrap();
    let child =
        PlayedChild::connect(&creds, configs[1].name.as_str().into(), Tier::Village, trust, COUNTY.into(), county.addr)
            .await
            .unwrap();
    (configs[0].clone(), county, child)
}

/// A small attachment is journaled in the store with the custody commit and its file
/// written without fsync (ADR 0010). After a power cut that lost the file's data
/// (played here: the journal row kept, the file cut short), the restarted node
/// rewrites the file from the journal before it runs, and drops the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_attachment_lost_from_its_file_is_restored_from_the_journal_on_start() {
    let dir = tempfile::tempdir().unwrap();
    let (county_config, county, child) = county_with_a_village(dir.path()).await;
    let bytes: Vec<u8> = (0..120 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let hash = ContentHash::of(&bytes);
    let offer = child.make_offer(CaseId(rand::random()), Modality::Ecg, Urgency::Stat, Arc::new(bytes.clone()));
    let took = child.offer_until_receipt(offer, Duration::from_secs(30)).await;
    assert!(took.is_some(), "no custody receipt");
    let blobs = node::blobs::BlobStore::open(&county_config.blob_dir()).unwrap();
    // The receipt leaves as soon as the custody commit returns; the file is written
    // right after it (before anything on the node may read it).
    let mut written = false;
    for _ in 0..500 {
        if std::fs::read(blobs.path_of(&hash)).is_ok_and(|b| b == bytes) {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(written, "the file was not written within 5 s of the receipt");
    assert!(
        !std::fs::read_dir(county_config.blob_dir().join("partial")).unwrap().any(|_| true),
        "no partial file: the bytes went through memory"
    );
    drop(child);
    county.shutdown().await.unwrap();

    // The state a power cut can leave: the journal row durable, the file's data not.
    let key = certs::keys::signing_key_from_pem(&std::fs::read_to_string(&county_config.tls.key).unwrap()).unwrap();
    let store = node::store::Store::open(&county_config.store_location(), key).await.unwrap();
    store.commit(&[node::store::Write::Blob { hash, bytes: Arc::new(bytes.clone()) }]).await.unwrap();
    store.close().await;
    std::fs::write(blobs.path_of(&hash), &bytes[..1000]).unwrap();

    let county = node::daemon::start(county_config.clone()).await.unwrap();
    assert_eq!(std::fs::read(blobs.path_of(&hash)).unwrap(), bytes, "rewritten from the journal");
    county.shutdown().await.unwrap();
    let store = node::store::Store::open_read_only(&county_config.store_location()).await.unwrap();
    assert!(store.journaled_blobs(10).await.unwrap().is_empty(), "and dropped from the journal");
    store.close().await;
}

/// The journal rows of small attachments are dropped while the node runs, once
/// their files are durable: a few with each later commit, and, when nothing else
/// commits, by commits of their own (`JOURNAL_FORGET_IDLE`). Ten cases and then
/// silence: every row must go without any further case or a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_rows_are_dropped_while_the_node_runs_idle() {
    let dir = tempfile::tempdir().unwrap();
    let (county_config, county, child) = county_with_a_village(dir.path()).await;
    const CASES: usize = 10;
    const _: () = assert!(CASES > node::daemon::JOURNAL_FORGETS_PER_COMMIT, "more rows than one idle commit drops");
    for i in 0..CASES {
        let bytes: Vec<u8> = (0..64 * 1024).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
        let offer = child.make_offer(CaseId(rand::random()), Modality::Ecg, Urgency::Stat, Arc::new(bytes));
        assert!(child.offer_until_receipt(offer, Duration::from_secs(30)).await.is_some(), "no receipt for case {i}");
    }
    let store = node::store::Store::open_read_only(&county_config.store_location()).await.unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let left = store.journaled_blobs(100).await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "{} journal rows still there 20 s after the last case", left.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.close().await;
    drop(child);
    county.shutdown().await.unwrap();
}
