//! Seeded chaos: a seven-tier federation of real node processes while nodes are
//! killed with SIGKILL at random moments and restarted. Bounded in rounds and time.
//! The short profile runs in CI; `TELEMED_CHAOS_ROUNDS=30 TELEMED_CHAOS_SEED=N
//! cargo test -p node --test node chaos -- --nocapture` is the long one.
//!
//! Invariants after every run: every submitted case is reported to its origin
//! exactly once, read exactly once anywhere, and every node's audit chain verifies.

use super::federation_processes::{Procs, ask, seven_tier_configs, spawn, wait_until};
use federation_proto::{Modality, Urgency};
use node::control::{Request, Response};
use std::time::Duration;

/// xorshift64*: a seeded source for which node dies when.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_keeps_every_case_exactly_once_through_random_kill_9_and_restarts() {
    let seed: u64 = std::env::var("TELEMED_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_cafe);
    let rounds: usize = std::env::var("TELEMED_CHAOS_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut rng = Rng(seed | 1);
    let tmp = tempfile::tempdir().unwrap();
    let (configs, paths, logs) = seven_tier_configs(tmp.path());
    let mut procs = Procs(Vec::new());
    for i in 0..configs.len() {
        procs.0.push((configs[i].name.clone(), spawn(&paths[i], &logs[i])));
    }
    for c in &configs {
        wait_until("control sockets", 60, || async { ask(c, Request::Status).await.is_some() }).await;
    }
    let village = &configs[6];
    let mut ids = Vec::new();
    let study = tmp.path().join("study.bin");
    std::fs::write(&study, (0..6 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<u8>>())
        .unwrap();
    let ct = node::demo::testdata_dir().join("CT_small.dcm");
    for round in 0..rounds {
        // Two cases per round (a 6 MB study and a real CT), each made distinct.
        for (k, file) in [&study, &ct].into_iter().enumerate() {
            let copy = tmp.path().join(format!("r{round}-{k}.dcm"));
            let mut bytes = std::fs::read(file).unwrap();
            if k == 0 {
                // The opaque study is made distinct; the CT stays a well-formed DICOM
                // file (the origin de-identifies it and refuses a damaged one).
                bytes.extend_from_slice(format!("round {round} case {k}").as_bytes());
            }
            std::fs::write(&copy, bytes).unwrap();
            let req = node::daemon::SubmitRequest {
                files: vec![copy],
                study: None,
                modality: Modality::Imaging,
                urgency: if k == 0 { Urgency::Routine } else { Urgency::Urgent },
                question: format!("chaos round {round}"),
                patient: format!("p-{round}-{k}"),
                task: None,
                details: Default::default(),
            };
            // The village itself may be down this round: wait for it.
            let mut submitted = None;
            for _ in 0..200 {
                if let Some(Response::Submitted { case_id }) = ask(village, Request::Submit(req.clone())).await {
                    submitted = Some(case_id);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ids.push(submitted.expect("the village accepts submissions"));
        }
        // Kill one node (any tier but the top two) at a random moment, restart it later.
        tokio::time::sleep(Duration::from_millis(rng.below(1_500))).await;
        let victim = 2 + rng.below(5) as usize;
        let (name, child) = &mut procs.0[victim];
        eprintln!("chaos seed {seed:#x} round {round}: kill -9 {name}");
        child.kill().unwrap();
        child.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(rng.below(1_000))).await;
        procs.0[victim].1 = spawn(&paths[victim], &logs[victim]);
    }
    let end = std::time::Instant::now() + Duration::from_secs(120);
    for id in &ids {
        loop {
            let done = matches!(ask(village, Request::Show { case_id: id.clone() }).await, Some(Response::Case(v)) if v.report.is_some());
            if done {
                break;
            }
            if std::time::Instant::now() > end {
                // Say where the case is stuck, node by node, before failing.
                for c in &configs {
                    if let Some(Response::Case(v)) = ask(c, Request::Show { case_id: id.clone() }).await {
                        eprintln!("  {}: {} — {}", c.name, v.status, v.where_);
                    }
                }
                if let Ok(dir) = std::env::var("TELEMED_TEST_KEEP_LOGS") {
                    for l in &logs {
                        let _ = std::fs::copy(l, std::path::Path::new(&dir).join(l.file_name().unwrap()));
                    }
                }
                panic!("seed {seed:#x}: case {id} has no report after the chaos");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(procs);
    // Exactly once, everywhere, and the audit chains hold.
    let mut signed = std::collections::BTreeMap::<String, usize>::new();
    for c in &configs {
        let store = node::store::SqliteStore::open_read_only(&c.db_path()).await.unwrap();
        store.verify_audit_chain().await.unwrap_or_else(|e| panic!("seed {seed:#x}: {}: {e}", c.name));
        for r in store.audit_tail(10_000).await.unwrap() {
            let Some(case) = r.case.map(|c| c.to_string()) else { continue };
            if r.kind == "report.signed" {
                *signed.entry(case.clone()).or_default() += 1;
            }
            if c.name == village.name && r.kind == "report.at_origin" {
                *signed.entry(format!("origin:{case}")).or_default() += 1;
            }
        }
    }
    for id in &ids {
        assert_eq!(signed.get(id), Some(&1), "seed {seed:#x}: case {id} must be read exactly once");
        assert_eq!(
            signed.get(&format!("origin:{id}")),
            Some(&1),
            "seed {seed:#x}: case {id} reported to the clinic once"
        );
    }
}
