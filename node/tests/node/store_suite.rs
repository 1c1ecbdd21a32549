#![cfg_attr(not(feature = "hub"), allow(dead_code, unused_imports))]
//! One store test suite, run against both backends: every test is a function of a
//! [`Backend`], instantiated once for SQLite (a file in a temporary directory) and
//! once for PostgreSQL (a fresh database on the test server that
//! `scripts/deps/postgres.sh` starts). The PostgreSQL tests fail, naming what to
//! run, when no server is reachable: they are never skipped.

use ed25519_dalek::SigningKey;
use federation_proto::{CaseId, Millis, Modality, NodeName, Urgency};
use node::store::{Store, StoreError, StoreLocation, Write};
use sqlx::Connection;
use std::sync::atomic::{AtomicU32, Ordering};
use tiers::harness::{AutoExperts, Harness, ModelScript, key_for};
use tiers::{CaseRecord, Change, ExpertPool, ModelSpec};

const MIN: u64 = 60_000;

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    #[cfg(feature = "hub")]
    Postgres,
}

/// A place for one store, and the directory that must outlive it.
struct Place {
    location: StoreLocation,
    _dir: tempfile::TempDir,
}

/// The test server's URL: `TELEMED_TEST_PG_URL`, else what `scripts/deps/postgres.sh`
/// wrote to target/test-pg-url.
fn pg_admin_url() -> String {
    if let Ok(url) = std::env::var("TELEMED_TEST_PG_URL") {
        return url;
    }
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-pg-url");
    match std::fs::read_to_string(&file) {
        Ok(url) => url.trim().to_owned(),
        Err(e) => panic!(
            "no PostgreSQL test server: set TELEMED_TEST_PG_URL or run `bash scripts/deps/postgres.sh` \
             (which writes {}): {e}",
            file.display()
        ),
    }
}

static DATABASES: AtomicU32 = AtomicU32::new(0);

async fn place(backend: Backend) -> Place {
    let dir = tempfile::tempdir().unwrap();
    let location = match backend {
        Backend::Sqlite => StoreLocation::Sqlite(dir.path().join("data").join("node.sqlite")),
        #[cfg(feature = "hub")]
        Backend::Postgres => {
            let admin = pg_admin_url();
            let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
                panic!("PostgreSQL test server not reachable at {admin} (run `bash scripts/deps/postgres.sh`): {e}")
            });
            let name = format!(
                "telemed_test_{}_{}_{}",
                std::process::id(),
                DATABASES.fetch_add(1, Ordering::Relaxed),
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros()
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
            let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
            StoreLocation::Postgres(format!("{base}/{name}"))
        }
    };
    Place { location, _dir: dir }
}

async fn open(place: &Place, node: &str) -> Store {
    Store::open(&place.location, key_for(node)).await.expect("open store")
}

/// Runs `sql` on the store's database with a plain connection, as an operator or
/// attacker with database access could.
async fn raw(place: &Place, sqlite: &str, postgres: &str) -> Result<(), sqlx::Error> {
    match &place.location {
        StoreLocation::Sqlite(path) => {
            let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
            let mut conn = sqlx::SqliteConnection::connect_with(&opts).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(sqlite.to_owned())).execute(&mut conn).await.map(drop)
        }
        #[cfg(feature = "hub")]
        StoreLocation::Postgres(url) => {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(postgres.to_owned())).execute(&mut conn).await.map(drop)
        }
        #[cfg(not(feature = "hub"))]
        StoreLocation::Postgres(_) => unreachable!("no PostgreSQL backend in this build: {postgres}"),
    }
}

/// A seven-tier run with real cores (as in store.rs's unit tests): ECG experts at
/// the county, imaging at the city, pathology at the provincial node, a township
/// model never confident enough.
fn federation() -> (Harness, Vec<CaseId>) {
    let mut h = Harness::seven_tier_chain(7);
    h.configure("township", |c| {
        c.models = vec![ModelSpec {
            id: "ecg-rhythm".into(),
            version: "1.0.0".into(),
            modality: Modality::Ecg,
            tasks: vec!["ecg.rhythm".into()],
            threshold: [0.99, 0.99, 0.99],
            cases_per_hour: 600,
        }]
    });
    h.node_mut("township")
        .models
        .insert("ecg-rhythm".into(), ModelScript { label: "afib".into(), confidence: 0.6, run_ms: 2_000 });
    for (node, modality) in
        [("county", Modality::Ecg), ("city", Modality::Imaging), ("provincial", Modality::Pathology)]
    {
        h.configure(node, |c| c.experts = vec![ExpertPool { modality, on_duty: 2, service_ms: 5 * MIN }]);
        h.node_mut(node).experts =
            Some(AutoExperts { name: format!("dr.{node}"), claim_after_ms: MIN, read_ms: 2 * MIN });
    }
    let mut ids = vec![
        h.submit("village", Modality::Pathology, Urgency::Routine, "biopsy margins clear?"),
        h.submit("village", Modality::Imaging, Urgency::Urgent, "fracture of the wrist?"),
        h.submit("village", Modality::Ecg, Urgency::Stat, "chest pain, rule out STEMI"),
    ];
    h.run_for(MIN);
    ids.push(h.submit("village", Modality::Ecg, Urgency::Stat, "palpitations"));
    h.run_for(12 * 60 * MIN);
    (h, ids)
}

fn records(h: &Harness, node: &str) -> Vec<CaseRecord> {
    let mut records = tiers::Store::load(&h.node(node).store).expect("in-memory store");
    records.sort_by_key(|r| r.info.case_id);
    records
}

fn put(record: &CaseRecord) -> Change {
    Change::PutCase(std::sync::Arc::new(record.clone()))
}

async fn apply_load_and_case_round_trip(backend: Backend) {
    let (h, ids) = federation();
    for node in ["village", "county", "provincial"] {
        let place = place(backend).await;
        let store = open(&place, node).await;
        let expected = records(&h, node);
        for r in &expected {
            store.apply(&put(r)).await.unwrap();
        }
        assert_eq!(store.load().await.unwrap(), expected, "{backend:?} at {node}");
        for r in &expected {
            assert_eq!(store.case(&r.info.case_id).await.unwrap().as_ref(), Some(r), "{backend:?} at {node}");
        }
        assert_eq!(store.case(&CaseId([0xee; 16])).await.unwrap(), None);
        if node == "village" {
            assert_eq!(expected.len(), ids.len());
        }
        store.close().await;
    }
}

async fn apply_is_idempotent_and_audits_each_change_once(backend: Backend) {
    let (h, _) = federation();
    let place = place(backend).await;
    let store = open(&place, "township").await;
    let recs = records(&h, "township");
    for r in &recs {
        store.apply(&put(r)).await.unwrap();
    }
    let audited = store.verify_audit_chain().await.unwrap();
    assert_eq!(audited, recs.len() as u64, "one case.<status> record per change");
    for r in &recs {
        store.apply(&put(r)).await.unwrap();
    }
    assert_eq!(store.verify_audit_chain().await.unwrap(), audited, "a repeated change writes nothing");
    assert_eq!(store.load().await.unwrap(), recs);
}

async fn summaries_are_most_urgent_first_with_the_reading_node(backend: Backend) {
    let (h, ids) = federation();
    let place = place(backend).await;
    let store = open(&place, "village").await;
    for r in records(&h, "village") {
        store.apply(&put(&r)).await.unwrap();
    }
    let summaries = store.summaries().await.unwrap();
    let order: Vec<CaseId> = summaries.iter().map(|s| s.id).collect();
    assert_eq!(order, [ids[2], ids[3], ids[1], ids[0]]);
    let read_at: Vec<Option<&str>> = summaries.iter().map(|s| s.read_at_node.as_ref().map(NodeName::as_str)).collect();
    assert_eq!(read_at, [Some("county"), Some("county"), Some("city"), Some("provincial")]);
    assert!(summaries.iter().all(|s| s.status == "reported" && s.origin.as_str() == "village"));
}

async fn audit_tail_and_pages_return_records_in_order(backend: Backend) {
    let place = place(backend).await;
    let store = open(&place, "county").await;
    let case = CaseId([7; 16]);
    for i in 1..=5u64 {
        assert_eq!(store.audit(Millis(i * 10), "test", Some(case), Some("city"), &format!("n{i}")).await.unwrap(), i);
    }
    let tail = store.audit_tail(2).await.unwrap();
    let got: Vec<(u64, Millis, &str)> = tail.iter().map(|a| (a.seq, a.at, a.detail.as_str())).collect();
    assert_eq!(got, [(4, Millis(40), "n4"), (5, Millis(50), "n5")]);
    assert_eq!((tail[0].case, tail[0].peer.as_deref()), (Some(case), Some("city")));
    assert_eq!(tail[1].prev_hash, tail[0].hash);
    let page = store.audit_from(2, 2).await.unwrap();
    assert_eq!(page.iter().map(|a| a.seq).collect::<Vec<_>>(), [2, 3]);
    let long = "é".repeat(5000);
    store.audit(Millis(60), "test", None, None, &long).await.unwrap();
    let last = store.audit_tail(1).await.unwrap().remove(0);
    assert!(last.detail.len() <= node::store::AUDIT_DETAIL_LEN_MAX && long.starts_with(&last.detail));
    assert_eq!(store.verify_audit_chain().await.unwrap(), 6);
}

async fn audit_log_refuses_update_and_delete_and_tampering_names_the_seq(backend: Backend) {
    let place = place(backend).await;
    let store = open(&place, "village").await;
    for i in 1..=6 {
        store.audit(Millis(i), "test", None, Some("township"), &format!("entry {i}")).await.unwrap();
    }
    for attack in ["UPDATE audit SET detail = 'x' WHERE seq = 1", "DELETE FROM audit WHERE seq = 2"] {
        let err = raw(&place, attack, attack).await.expect_err(attack);
        assert!(err.to_string().contains("append-only"), "{backend:?} {attack}: {err}");
    }
    assert_eq!(store.verify_audit_chain().await.unwrap(), 6);
    raw(
        &place,
        "DROP TRIGGER audit_no_update; UPDATE audit SET detail = 'nothing happened' WHERE seq = 3",
        "DROP TRIGGER audit_no_update ON audit; UPDATE audit SET detail = 'nothing happened' WHERE seq = 3",
    )
    .await
    .unwrap();
    match store.verify_audit_chain().await {
        Err(StoreError::AuditChainBroken { seq: 3, .. }) => {}
        other => panic!("{backend:?}: expected a broken chain at seq 3, got {other:?}"),
    }
    raw(
        &place,
        "DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq = 2",
        "DROP TRIGGER audit_no_delete ON audit; DELETE FROM audit WHERE seq = 2",
    )
    .await
    .unwrap();
    match store.verify_audit_chain().await {
        Err(StoreError::AuditChainBroken { seq: 2, reason }) => assert!(reason.contains("missing"), "{reason}"),
        other => panic!("{backend:?}: expected a broken chain at seq 2, got {other:?}"),
    }
}

async fn concurrent_writers_from_two_handles_keep_one_chain(backend: Backend) {
    let (h, _) = federation();
    let place = place(backend).await;
    // Two handles on one database stand for two processes (e.g. the daemon and an
    // admin tool): writes from both interleave into one verified chain.
    let first = open(&place, "township").await;
    let second = open(&place, "township").await;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let store = if t % 2 == 0 { first.clone() } else { second.clone() };
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..10 {
                seqs.push(store.audit(Millis(t * 100 + i), "test", None, None, "").await.unwrap());
            }
            seqs
        }));
    }
    let recs = records(&h, "township");
    for r in &recs {
        first.apply(&put(r)).await.unwrap();
    }
    let mut seqs = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "one caller's writes commit in call order");
        seqs.extend(mine);
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 80, "no seq handed out twice");
    assert_eq!(first.verify_audit_chain().await.unwrap(), 80 + recs.len() as u64);
    assert_eq!(second.load().await.unwrap(), recs);
}

async fn records_survive_reopen_and_a_new_key_is_handed_over(backend: Backend) {
    let (h, _) = federation();
    let place = place(backend).await;
    let recs = records(&h, "county");
    let store = open(&place, "county").await;
    for r in &recs {
        store.apply(&put(r)).await.unwrap();
    }
    let audited = store.verify_audit_chain().await.unwrap();
    let version = store.schema_version().await.unwrap();
    store.close().await;
    drop(store);

    let store = open(&place, "county").await;
    assert_eq!(store.load().await.unwrap(), recs);
    assert_eq!(store.verify_audit_chain().await.unwrap(), audited, "reopening with the same key appends nothing");
    assert_eq!(store.schema_version().await.unwrap(), version, "migrations run once");
    store.close().await;

    let rotated: SigningKey = key_for("county-2027");
    let store = Store::open(&place.location, rotated).await.unwrap();
    let tail = store.audit_tail(1).await.unwrap();
    assert_eq!(tail[0].kind, node::store::AUDIT_KEY_CHANGED);
    assert_eq!(store.verify_audit_chain().await.unwrap(), audited + 1);
}

async fn a_read_only_store_sees_commits_and_refuses_writes(backend: Backend) {
    let (h, _) = federation();
    let place = place(backend).await;
    let recs = records(&h, "city");
    let writer = open(&place, "city").await;
    writer.apply(&put(&recs[0])).await.unwrap();
    let reader = Store::open_read_only(&place.location).await.unwrap();
    assert_eq!(reader.load().await.unwrap(), &recs[..1]);
    for r in &recs[1..] {
        writer.apply(&put(r)).await.unwrap();
    }
    assert_eq!(reader.load().await.unwrap(), recs, "the reader sees what the writer committed");
    assert_eq!(reader.summaries().await.unwrap(), writer.summaries().await.unwrap());
    assert_eq!(reader.verify_audit_chain().await.unwrap(), recs.len() as u64);
    assert!(matches!(reader.apply(&put(&recs[0])).await, Err(StoreError::ReadOnly { .. })));
    assert!(matches!(reader.audit(Millis(1), "x", None, None, "").await, Err(StoreError::ReadOnly { .. })));
}

/// Makes the database refuse to insert the case `victim` (a trigger named refuse_one).
async fn refuse_inserts_of(place: &Place, victim: &str) {
    raw(
        place,
        &format!(
            "CREATE TRIGGER refuse_one BEFORE INSERT ON cases WHEN NEW.case_id = '{victim}' \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        ),
        &format!(
            "CREATE FUNCTION refuse_one() RETURNS trigger AS $$ BEGIN \
               IF NEW.case_id = '{victim}' THEN RAISE EXCEPTION 'refused by the test'; END IF; \
               RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER refuse_one BEFORE INSERT ON cases FOR EACH ROW EXECUTE FUNCTION refuse_one()"
        ),
    )
    .await
    .unwrap();
}

/// Group commit: one batch of case changes and audit records is one transaction,
/// all or nothing, with each write doing what `apply` / `audit` would alone.
async fn a_batch_commits_all_its_writes_or_none(backend: Backend) {
    let (h, _) = federation();
    let place = place(backend).await;
    let store = open(&place, "county").await;
    let recs = records(&h, "county");
    assert!(recs.len() >= 2);
    let batch = vec![
        Write::Change(put(&recs[0])),
        Write::audit(Millis(5), "link.up", None, Some("v1"), "village"),
        Write::Change(put(&recs[1])),
    ];
    // The database refuses the third write: nothing of the batch may remain.
    let victim = recs[1].info.case_id.to_string();
    refuse_inserts_of(&place, &victim).await;
    let err = store.commit(&batch).await.unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err}");
    assert!(store.load().await.unwrap().is_empty(), "a failed batch leaves no case behind");
    assert_eq!(store.verify_audit_chain().await.unwrap(), 0, "and no audit record");

    raw(&place, "DROP TRIGGER refuse_one", "DROP TRIGGER refuse_one ON cases").await.unwrap();
    store.commit(&batch).await.unwrap();
    assert_eq!(store.load().await.unwrap(), recs[..2].to_vec());
    let tail = store.audit_tail(10).await.unwrap();
    let kinds: Vec<&str> = tail.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert!(kinds[0].starts_with("case.") && kinds[2].starts_with("case."), "{kinds:?}");
    assert_eq!(kinds[1], "link.up", "writes land in batch order");
    assert_eq!(store.verify_audit_chain().await.unwrap(), 3);

    // Repeated: the unchanged cases write nothing, the audit record is appended again.
    store.commit(&batch).await.unwrap();
    assert_eq!(store.verify_audit_chain().await.unwrap(), 4);
    store.commit(&[]).await.unwrap();
    assert_eq!(store.verify_audit_chain().await.unwrap(), 4, "an empty batch writes nothing");
}

/// The blob journal (ADR 0009): a small attachment's bytes commit with the case that
/// holds it, all or nothing, survive a reopen, and go once forgotten.
async fn journaled_blobs_commit_with_their_case_and_are_forgotten(backend: Backend) {
    use federation_proto::ContentHash;
    let (h, _) = federation();
    let place = place(backend).await;
    let store = open(&place, "county").await;
    let recs = records(&h, "county");
    let bytes: Vec<u8> = (0..120 * 1024).map(|i| (i % 253) as u8).collect();
    let hash = ContentHash::of(&bytes);
    let blob = || Write::Blob { hash, bytes: std::sync::Arc::new(bytes.clone()) };
    assert!(store.journaled_blobs(10).await.unwrap().is_empty());

    // Refused with its batch: neither the case nor the bytes remain.
    let victim = recs[0].info.case_id.to_string();
    refuse_inserts_of(&place, &victim).await;
    assert!(store.commit(&[blob(), Write::Change(put(&recs[0]))]).await.is_err());
    assert!(store.journaled_blobs(10).await.unwrap().is_empty(), "a failed batch journals nothing");
    raw(&place, "DROP TRIGGER refuse_one", "DROP TRIGGER refuse_one ON cases").await.unwrap();

    store.commit(&[blob(), Write::Change(put(&recs[0])), blob()]).await.unwrap();
    store.commit(&[blob()]).await.unwrap();
    assert_eq!(store.journaled_blobs(10).await.unwrap(), vec![hash], "journaled once");
    store.close().await;
    let store = open(&place, "county").await;
    assert_eq!(store.journaled_blob(&hash).await.unwrap().as_deref(), Some(&bytes[..]), "durable across a reopen");
    assert_eq!(store.load().await.unwrap(), recs[..1].to_vec());

    store.commit(&[Write::ForgetBlob(hash)]).await.unwrap();
    assert!(store.journaled_blobs(10).await.unwrap().is_empty());
    assert_eq!(store.journaled_blob(&hash).await.unwrap(), None);
    store.commit(&[Write::ForgetBlob(hash)]).await.unwrap();
}

macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Backend::Sqlite).await
            })*
        }
        #[cfg(feature = "hub")]
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Backend::Postgres).await
            })*
        }
    };
}

suite!(
    apply_load_and_case_round_trip,
    apply_is_idempotent_and_audits_each_change_once,
    summaries_are_most_urgent_first_with_the_reading_node,
    audit_tail_and_pages_return_records_in_order,
    audit_log_refuses_update_and_delete_and_tampering_names_the_seq,
    concurrent_writers_from_two_handles_keep_one_chain,
    records_survive_reopen_and_a_new_key_is_handed_over,
    a_read_only_store_sees_commits_and_refuses_writes,
    a_batch_commits_all_its_writes_or_none,
    journaled_blobs_commit_with_their_case_and_are_forgotten,
);
