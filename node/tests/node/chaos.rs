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
    let mut ids = Vec::new();
    let study = tmp.path().join("study.bin");
    std::fs::write(&study, (0..6 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<u8>>())
        .unwrap();
    let ct = node::demo::testdata_dir().join("CT_small.dcm");
    for round in 0..rounds {
        // Two cases per round: a 6 MB study made distinct, and a real CT (kept a
        // well-formed DICOM file: the origin de-identifies it and refuses a damaged one).
        // The village itself may be down this round: submit_copy waits for it.
        for (k, file) in [&study, &ct].into_iter().enumerate() {
            ids.push(submit_copy(&configs[6], tmp.path(), file, &format!("r{round}-{k}"), k == 0).await.unwrap());
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
    wait_for_reports(&configs, &logs, 6, &ids, 120, seed).await;
    drop(procs);
    // Exactly once, everywhere, and the audit chains hold.
    assert_exactly_once(&configs, |i| configs[i].db_path(), 6, &ids, seed).await;
}

// ---------------------------------------------------------------------------------
// Lossy links, dropped connections and partitions: a UDP proxy on every link.
// ---------------------------------------------------------------------------------

/// What a [`LinkProxy`] does to the datagrams it carries, both ways.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Pass,
    /// Drops each datagram with probability `drop_permille`/1000 and delays the rest
    /// by up to `delay_ms` (so they also arrive reordered).
    Lossy {
        drop_permille: u64,
        delay_ms: u64,
    },
    /// Drops everything: a partition between the child and its parent. Held longer than
    /// `node::transport::IDLE_TIMEOUT`, it drops the QUIC connection on both sides.
    Cut,
}

/// A UDP proxy between a child and its parent: QUIC runs over UDP, so dropping and
/// delaying datagrams here is what a bad network does to the link (no root needed).
/// The child dials the proxy's address; each child socket gets its own upstream socket.
struct LinkProxy {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<(Fault, Rng)>>,
    counts: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>, // [forwarded, dropped]
    task: tokio::task::JoinHandle<()>,
}

/// Upper bounds: flows per proxy, datagrams waiting in a delay.
const PROXY_FLOWS_MAX: usize = 16;
const PROXY_DELAYED_MAX: u64 = 4_096;

impl LinkProxy {
    async fn start(parent: std::net::SocketAddr, seed: u64) -> LinkProxy {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        use std::sync::{Arc, Mutex};
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let state = Arc::new(Mutex::new((Fault::Pass, Rng(seed | 1))));
        let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let delayed = Arc::new(AtomicU64::new(0));
        // Decides one datagram's fate: None = dropped, Some(delay).
        let fate = {
            let (state, counts, delayed) = (state.clone(), counts.clone(), delayed.clone());
            move || -> Option<Duration> {
                let mut s = state.lock().unwrap();
                let (fault, rng) = &mut *s;
                let verdict = match *fault {
                    Fault::Pass => Some(Duration::ZERO),
                    Fault::Cut => None,
                    Fault::Lossy { drop_permille, delay_ms } => {
                        if rng.below(1000) < drop_permille || delayed.load(Relaxed) >= PROXY_DELAYED_MAX {
                            None
                        } else {
                            Some(Duration::from_millis(rng.below(delay_ms + 1)))
                        }
                    }
                };
                counts[usize::from(verdict.is_none())].fetch_add(1, Relaxed);
                verdict
            }
        };
        // Sends now or after a delay (a task per delayed datagram, bounded above).
        let send = {
            let delayed = delayed.clone();
            move |sock: Arc<tokio::net::UdpSocket>, to: std::net::SocketAddr, buf: Vec<u8>, delay: Duration| {
                if delay.is_zero() {
                    let _ = sock.try_send_to(&buf, to);
                } else {
                    delayed.fetch_add(1, Relaxed);
                    let delayed = delayed.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = sock.send_to(&buf, to).await;
                        delayed.fetch_sub(1, Relaxed);
                    });
                }
            }
        };
        let task = tokio::spawn(async move {
            let mut flows: std::collections::HashMap<std::net::SocketAddr, Arc<tokio::net::UdpSocket>> =
                Default::default();
            let mut backs = Vec::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else { continue };
                let up = match flows.get(&from) {
                    Some(up) => up.clone(),
                    None if flows.len() >= PROXY_FLOWS_MAX => continue,
                    None => {
                        let up = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        up.connect(parent).await.unwrap();
                        flows.insert(from, up.clone());
                        // Parent → child for this flow.
                        let (up2, front2, fate2, send2) = (up.clone(), front.clone(), fate.clone(), send.clone());
                        backs.push(tokio::spawn(async move {
                            let mut buf = vec![0u8; 65_536];
                            loop {
                                // An error (an ICMP-reported refusal) is one-shot: go on.
                                let Ok(n) = up2.recv(&mut buf).await else { continue };
                                if let Some(delay) = fate2() {
                                    send2(front2.clone(), from, buf[..n].to_vec(), delay);
                                }
                            }
                        }));
                        up
                    }
                };
                if let Some(delay) = fate() {
                    send(up, parent, buf[..n].to_vec(), delay);
                }
            }
        });
        LinkProxy { addr, state, counts, task }
    }

    fn set(&self, fault: Fault) {
        self.state.lock().unwrap().0 = fault;
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Submits a distinct copy of `file` at `node`, waiting (bounded) while it is down.
async fn submit_copy(
    node: &node::config::Config,
    dir: &std::path::Path,
    file: &std::path::Path,
    tag: &str,
    opaque: bool,
) -> Result<String, String> {
    let copy = dir.join(format!("{tag}.dcm"));
    let mut bytes = std::fs::read(file).unwrap();
    if opaque {
        bytes.extend_from_slice(tag.as_bytes());
    }
    std::fs::write(&copy, bytes).unwrap();
    let req = node::daemon::SubmitRequest {
        files: vec![copy],
        study: None,
        modality: Modality::Imaging,
        urgency: if opaque { Urgency::Routine } else { Urgency::Urgent },
        question: format!("chaos {tag}"),
        patient: format!("p-{tag}"),
        task: None,
        details: Default::default(),
    };
    for _ in 0..200 {
        match ask(node, Request::Submit(req.clone())).await {
            Some(Response::Submitted { case_id }) => return Ok(case_id),
            Some(Response::Error { message }) => return Err(message),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Err(format!("{} did not answer a submission for 10 s", node.name))
}

/// Waits (bounded) until every case has its report back at the origin; on time-out says
/// where each stuck case is, node by node, keeps the logs in `$TELEMED_TEST_KEEP_LOGS`
/// if set, and fails.
async fn wait_for_reports(
    configs: &[node::config::Config],
    logs: &[std::path::PathBuf],
    origin: usize,
    ids: &[String],
    secs: u64,
    seed: u64,
) {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    for id in ids {
        loop {
            let done = matches!(ask(&configs[origin], Request::Show { case_id: id.clone() }).await,
                Some(Response::Case(v)) if v.report.is_some());
            if done {
                break;
            }
            if std::time::Instant::now() > end {
                for c in configs {
                    if let Some(Response::Case(v)) = ask(c, Request::Show { case_id: id.clone() }).await {
                        eprintln!("  {}: {} — {}", c.name, v.status, v.where_);
                    }
                }
                if let Ok(dir) = std::env::var("TELEMED_TEST_KEEP_LOGS") {
                    for l in logs {
                        let _ = std::fs::copy(l, std::path::Path::new(&dir).join(l.file_name().unwrap()));
                    }
                }
                panic!("seed {seed:#x}: case {id} has no report after {secs} s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The invariants: every node's audit chain verifies; every case was read exactly once
/// in the whole federation and reported exactly once to its origin. `db` gives each
/// node's store file.
async fn assert_exactly_once(
    configs: &[node::config::Config],
    db: impl Fn(usize) -> std::path::PathBuf,
    origin: usize,
    ids: &[String],
    seed: u64,
) {
    let mut signed = std::collections::BTreeMap::<String, usize>::new();
    for (i, c) in configs.iter().enumerate() {
        let store = node::store::SqliteStore::open_read_only(&db(i)).await.unwrap();
        store.verify_audit_chain().await.unwrap_or_else(|e| panic!("seed {seed:#x}: {}: {e}", c.name));
        for r in store.audit_tail(100_000).await.unwrap() {
            let Some(case) = r.case.map(|c| c.to_string()) else { continue };
            if r.kind == "report.signed" {
                *signed.entry(case.clone()).or_default() += 1;
            }
            if i == origin && r.kind == "report.at_origin" {
                *signed.entry(format!("origin:{case}")).or_default() += 1;
            }
        }
    }
    for id in ids {
        assert_eq!(signed.get(id), Some(&1), "seed {seed:#x}: case {id} must be read exactly once");
        assert_eq!(signed.get(&format!("origin:{id}")), Some(&1), "seed {seed:#x}: case {id} reported once");
    }
}

/// Seeded rounds of bad networks on the links of a seven-tier federation (real node
/// processes, every link through a [`LinkProxy`]): per round two cases are submitted,
/// then one fault is applied to randomly chosen links — loss with delay and reordering,
/// a short partition (the connection survives), or a partition longer than the idle
/// timeout (the connection is dropped on both sides and redialled). The kinds take
/// turns, so even the three-round CI profile tries each once. The control plane
/// (libp2p gossip) is off here so that every federation datagram crosses the proxies.
/// Long profile: `TELEMED_CHAOS_NET_ROUNDS=12 TELEMED_CHAOS_SEED=N cargo test -p node
/// --test node chaos::federation_keeps -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_keeps_every_case_exactly_once_through_lossy_links_dropped_connections_and_partitions() {
    let seed: u64 = std::env::var("TELEMED_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_0be7);
    let rounds: usize = std::env::var("TELEMED_CHAOS_NET_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut rng = Rng(seed | 1);
    let tmp = tempfile::tempdir().unwrap();
    let (mut configs, paths, logs) = seven_tier_configs(tmp.path());
    // Link i joins node i (child) to node i-1 (parent).
    let mut proxies = Vec::new();
    for i in 1..configs.len() {
        let proxy = LinkProxy::start(configs[i - 1].listen, seed.wrapping_add(i as u64)).await;
        configs[i].parents[0].addr = proxy.addr;
        proxies.push(proxy);
    }
    for c in configs.iter_mut() {
        c.control = None;
        super::federation_processes::write_config(tmp.path(), c);
    }
    let mut procs = Procs(Vec::new());
    for i in 0..configs.len() {
        procs.0.push((configs[i].name.clone(), spawn(&paths[i], &logs[i])));
    }
    for c in &configs {
        wait_until("control sockets", 60, || async { ask(c, Request::Status).await.is_some() }).await;
    }
    let study = tmp.path().join("study.bin");
    std::fs::write(&study, (0..8 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<u8>>())
        .unwrap();
    let ct = node::demo::testdata_dir().join("CT_small.dcm");
    let t0 = std::time::Instant::now();
    let mut ids = Vec::new();
    let mut long_cuts = Vec::new(); // children whose link up was cut past the idle timeout
    for round in 0..rounds {
        // Up to two links at once, among those that carry cases and reports.
        let links: Vec<usize> = (0..1 + rng.below(2)).map(|_| 3 + rng.below(3) as usize).collect();
        let (fault, hold) = match round % 3 {
            0 => (
                Fault::Lossy { drop_permille: 50 + rng.below(250), delay_ms: rng.below(80) },
                Duration::from_millis(2_000 + rng.below(3_000)),
            ),
            1 => (Fault::Cut, Duration::from_millis(1_000 + rng.below(4_000))),
            _ => (Fault::Cut, node::transport::IDLE_TIMEOUT + Duration::from_millis(2_000 + rng.below(2_000))),
        };
        if hold > node::transport::IDLE_TIMEOUT {
            long_cuts.extend(links.iter().map(|&l| l + 1));
        }
        let names: Vec<&str> = links.iter().map(|&l| configs[l + 1].name.as_str()).collect();
        eprintln!("{:?} chaos seed {seed:#x} round {round}: {fault:?} for {hold:?} above {names:?}", t0.elapsed());
        for &l in &links {
            proxies[l].set(fault);
        }
        // Two new cases cross the links while the fault is on.
        for (k, file) in [&study, &ct].into_iter().enumerate() {
            ids.push(submit_copy(&configs[6], tmp.path(), file, &format!("net-r{round}-{k}"), k == 0).await.unwrap());
        }
        tokio::time::sleep(hold).await;
        for &l in &links {
            proxies[l].set(Fault::Pass);
        }
    }
    wait_for_reports(&configs, &logs, 6, &ids, 180, seed).await;
    eprintln!("{:?} every report is back", t0.elapsed());
    for (i, p) in proxies.iter().enumerate() {
        use std::sync::atomic::Ordering::Relaxed;
        eprintln!(
            "  link {} → {}: {} datagrams forwarded, {} dropped",
            configs[i + 1].name,
            configs[i].name,
            p.counts[0].load(Relaxed),
            p.counts[1].load(Relaxed)
        );
    }
    let dropped: u64 = proxies.iter().map(|p| p.counts[1].load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert!(dropped > 0, "the faults dropped datagrams");
    drop(procs);
    assert_exactly_once(&configs, |i| configs[i].db_path(), 6, &ids, seed).await;
    // A cut past the idle timeout really dropped the connection (and it was redialled:
    // the reports above came back over it).
    for child in long_cuts {
        let store = node::store::SqliteStore::open_read_only(&configs[child].db_path()).await.unwrap();
        let parent = configs[child - 1].name.as_str();
        let downs = store.audit_tail(100_000).await.unwrap().iter().filter(|r| r.kind == "link.down").count();
        assert!(
            downs > 0,
            "seed {seed:#x}: {}'s link to {parent} was cut past the idle timeout but never went down",
            configs[child].name
        );
    }
}

// ---------------------------------------------------------------------------------
// A full disk on one node.
// ---------------------------------------------------------------------------------

/// A private mount namespace (`unshare --mount`, kept alive by a `sleep`) holding a
/// size-limited tmpfs at `dir`: a real file system that really fills up, visible only
/// to processes started in it (`nsenter`) and to this test through
/// `/proc/<holder>/root`. Nothing is mounted on the host; it goes when its last process
/// does. Needs root (CI runs as root); without it the test fails and says so.
struct SmallDisk {
    holder: std::process::Child,
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn new(dir: &std::path::Path, size_mib: u32) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let holder = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs -o size={size_mib}m telemed-chaos \"$0\" && touch \"$0/.mounted\" && exec sleep 3600"
            ))
            .arg(dir)
            .spawn()
            .expect("unshare (util-linux) runs");
        let mut disk = SmallDisk { holder, dir: dir.to_owned() };
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !disk.view().join(".mounted").exists() {
            if std::time::Instant::now() > end || matches!(disk.holder.try_wait(), Ok(Some(_))) {
                panic!(
                    "could not mount a {size_mib} MiB tmpfs in a private mount namespace (`unshare --mount` + \
                     `mount -t tmpfs` need root or CAP_SYS_ADMIN; CI runs as root): the full-disk test cannot run"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        disk
    }

    /// The tmpfs as this test sees it.
    fn view(&self) -> std::path::PathBuf {
        std::path::Path::new(&format!("/proc/{}/root", self.holder.id())).join(self.dir.strip_prefix("/").unwrap())
    }

    /// Starts a node inside the namespace.
    fn spawn(&self, config_path: &std::path::Path, log: &std::path::Path) -> std::process::Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        std::process::Command::new("nsenter")
            .args([
                "-t",
                &self.holder.id().to_string(),
                "-m",
                "--",
                env!("CARGO_BIN_EXE_telemed-node"),
                "run",
                "--config",
            ])
            .arg(config_path)
            .env("TELEMED_LOG", "info,quinn=warn,quinn_proto=warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Writes a filler file until at most `leave` bytes are free (bounded by the
    /// file system's size): another program filling the disk under the node.
    fn fill(&self, leave: u64) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(self.view().join("filler")).unwrap();
        let chunk = vec![0xA5u8; 256 << 10];
        let mut written = 0u64;
        while node::disk_guard::free_bytes(&self.view()).unwrap() > leave {
            match f.write(&chunk) {
                Ok(n) if n > 0 => written += n as u64,
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the small disk: {e}"),
            }
            assert!(written < 1 << 30, "the small disk never filled");
        }
        f.sync_all().unwrap();
        written
    }

    fn free(&self) {
        std::fs::remove_file(self.view().join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The township's data directory on a 96 MiB tmpfs. It takes custody of a case while
/// its link up is cut, then another program fills its disk to half the node's reserve
/// (`disk_guard::RESERVE_BYTES`): it must refuse new work with a clear "disk full"
/// error (a submission there, offers from the village), keep the case it acknowledged,
/// stay up and pass that case on, and once space returns carry every case through —
/// each read once and reported once to the village, every audit chain verifying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_a_full_disk_refuses_new_work_loses_nothing_it_acknowledged_and_recovers() {
    let seed = 0xd15c_f011;
    let tmp = tempfile::tempdir().unwrap();
    let (mut configs, paths, logs) = seven_tier_configs(tmp.path());
    let township = 5;
    let disk = SmallDisk::new(&tmp.path().join("fd"), 96);
    configs[township].data_dir = disk.dir.clone();
    // The township's link up goes through a proxy, to hold a case there.
    let up = LinkProxy::start(configs[township - 1].listen, seed).await;
    configs[township].parents[0].addr = up.addr;
    for c in configs.iter_mut() {
        c.control = None;
        super::federation_processes::write_config(tmp.path(), c);
    }
    let mut procs = Procs(Vec::new());
    for i in 0..configs.len() {
        let child = if i == township { disk.spawn(&paths[i], &logs[i]) } else { spawn(&paths[i], &logs[i]) };
        procs.0.push((configs[i].name.clone(), child));
    }
    // The test reaches the township's control socket and store through the namespace.
    let mut seen = configs.clone();
    seen[township].data_dir = disk.view();
    for c in &seen {
        wait_until("control sockets", 60, || async { ask(c, Request::Status).await.is_some() }).await;
    }
    let (village, town) = (&seen[6], &seen[township]);
    let ct = node::demo::testdata_dir().join("CT_small.dcm");
    let study = tmp.path().join("study.bin");
    std::fs::write(&study, (0..2 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<u8>>())
        .unwrap();
    let mut ids = vec![submit_copy(village, tmp.path(), &ct, "disk-0", false).await.unwrap()];
    wait_for_reports(&seen, &logs, 6, &ids, 120, seed).await;

    // Custody of a case at the township while it cannot pass it on.
    up.set(Fault::Cut);
    let held = submit_copy(village, tmp.path(), &study, "disk-held", true).await.unwrap();
    wait_until("the township's custody of the held case", 60, || async {
        matches!(ask(village, Request::Show { case_id: held.clone() }).await,
            Some(Response::Case(v)) if v.status == "forwarded")
    })
    .await;
    ids.push(held.clone());

    // The disk fills.
    let filled = disk.fill(node::disk_guard::RESERVE_BYTES / 2);
    let free = node::disk_guard::free_bytes(&disk.view()).unwrap();
    eprintln!("small disk filled with {filled} bytes, {free} free");
    assert!(free < node::disk_guard::RESERVE_BYTES);
    // New work is refused with a clear error, at the township itself...
    let refused = submit_copy(town, tmp.path(), &study, "disk-refused", true).await;
    let message = refused.expect_err("a node whose disk is full refuses a submission");
    assert!(message.starts_with("disk full: "), "{message}");
    eprintln!("submission at the full township refused: {message}");
    // ...and from the village: cases offered now wait there, they are not lost.
    let waiting = [
        submit_copy(village, tmp.path(), &ct, "disk-1", false).await.unwrap(),
        submit_copy(village, tmp.path(), &study, "disk-2", true).await.unwrap(),
    ];
    up.set(Fault::Pass);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(matches!(ask(town, Request::Status).await, Some(Response::Status(_))), "the township is still up");
    for id in &waiting {
        let Some(Response::Case(v)) = ask(village, Request::Show { case_id: id.clone() }).await else {
            panic!("case {id} lost at the village")
        };
        assert!(
            v.report.is_none() && v.status != "forwarded",
            "{id} not taken by a full disk: {} {}",
            v.status,
            v.where_
        );
    }
    let Some(Response::Case(v)) = ask(town, Request::Show { case_id: held.clone() }).await else {
        panic!("the township lost the case it acknowledged")
    };
    eprintln!("held case at the full township: {} — {}", v.status, v.where_);
    let log = std::fs::read_to_string(&logs[township]).unwrap();
    assert!(log.contains("case offer refused: disk full"), "the township logs the refused offers");
    // The case it acknowledged went on up once the link returned, disk full or not.
    wait_for_reports(&seen, &logs, 6, std::slice::from_ref(&held), 120, seed).await;

    // Space returns: everything goes through, exactly once.
    disk.free();
    ids.extend(waiting);
    wait_for_reports(&seen, &logs, 6, &ids, 180, seed).await;
    // SQLite resolves `/proc/<pid>/root` to the host's path, so the township's store
    // is copied out of the namespace (the node stopped first) and checked there.
    procs.0[township].1.kill().unwrap();
    procs.0[township].1.wait().unwrap();
    let town_db = seen[township].db_path();
    let copy = tmp.path().join("township-copy.sqlite");
    for ext in ["", "-wal"] {
        let from = std::path::PathBuf::from(format!("{}{ext}", town_db.display()));
        if from.exists() {
            std::fs::copy(&from, format!("{}{ext}", copy.display())).unwrap();
        }
    }
    drop(procs);
    assert_exactly_once(&configs, |i| if i == township { copy.clone() } else { configs[i].db_path() }, 6, &ids, seed)
        .await;
}
