//! Footprint of the village node, as separate processes (release build):
//! start-up time (exec → control socket answering), idle RSS, and peak RSS while it
//! sends a large slide (default 1 GiB) to its township parent over loopback QUIC.
//!
//! Run: `cargo build --release -p node --bin telemed-node && cargo run --release -p node --example bench_village`
//! (env: BENCH_SLIDE_MIB, default 1024; TELEMED_NODE_BIN, default target/release/telemed-node).

use federation_proto::{Modality, Tier, Urgency};
use node::config::ParentConfig;
use node::control::{Request, Response};
use node::demo::{PlannedNode, provision};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(|l| l.to_owned()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let slide_mib: u64 = std::env::var("BENCH_SLIDE_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let bin: PathBuf = std::env::var_os("TELEMED_NODE_BIN")
        .map(Into::into)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/telemed-node"));
    let dir = tempfile::tempdir()?;
    let township = "gaocheng.dengfeng.zhengzhou.henan.cn";
    let plan = vec![
        PlannedNode { name: township.into(), tier: Tier::Township, parent: None, experts: vec![] },
        PlannedNode {
            name: format!("v1.{township}"),
            tier: Tier::Village,
            parent: Some(township.into()),
            experts: vec![],
        },
    ];
    let mut configs = provision(dir.path(), &plan)?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    configs[0].listen = format!("127.0.0.1:{port}").parse()?;
    configs[1].parents = vec![ParentConfig { name: township.into(), tier: Tier::Township, addr: configs[0].listen }];
    let mut paths = Vec::new();
    for c in &configs {
        let p = dir.path().join(format!("{}.toml", c.name));
        std::fs::write(&p, toml::to_string(c)?)?;
        paths.push(p);
    }
    let spawn = |p: &PathBuf| {
        Command::new(&bin)
            .args(["run", "--config"])
            .arg(p)
            .env("TELEMED_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    };
    let mut kill = Kill(Vec::new());
    // Start-up: the village alone (its parent not yet up), five times.
    let mut startups = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut child = spawn(&paths[1])?;
        loop {
            if node::control::request(&configs[1].control_socket(), &Request::Status).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        startups.push(t.elapsed());
        child.kill()?;
        child.wait()?;
    }
    startups.sort();
    println!(
        "start-up (exec → control socket answers), 5 runs: median {:.0} ms, max {:.0} ms",
        startups[2].as_secs_f64() * 1e3,
        startups[4].as_secs_f64() * 1e3
    );

    kill.0.push(spawn(&paths[0])?);
    kill.0.push(spawn(&paths[1])?);
    let village_pid = kill.0[1].id();
    for c in &configs {
        while node::control::request(&c.control_socket(), &Request::Status).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("village idle (linked to its parent): RSS {:.1} MiB", status_kib(village_pid, "VmRSS:") as f64 / 1024.0);

    // A large slide, written in 1 MiB blocks (never held whole in memory).
    let slide = dir.path().join("slide.svs");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&slide)?);
        let mut block = vec![0u8; 1 << 20];
        for i in 0..slide_mib {
            for (j, b) in block.iter_mut().enumerate() {
                *b = (i as usize * 31 + j * 7) as u8;
            }
            f.write_all(&block)?;
        }
    }
    let req = node::daemon::SubmitRequest {
        files: vec![slide],
        study: None,
        modality: Modality::Pathology,
        urgency: Urgency::Routine,
        question: "footprint benchmark".into(),
        patient: "bench".into(),
        task: None,
        details: Default::default(),
    };
    let t = Instant::now();
    let Response::Submitted { case_id } =
        node::control::request(&configs[1].control_socket(), &Request::Submit(req)).await?
    else {
        anyhow::bail!("submit refused")
    };
    let imported = t.elapsed();
    loop {
        if let Ok(Response::Case(v)) =
            node::control::request(&configs[1].control_socket(), &Request::Show { case_id: case_id.clone() }).await
            && v.status == "forwarded"
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = t.elapsed();
    println!(
        "{slide_mib} MiB slide: import {:.1} s, custody at the township after {:.1} s ({:.0} MiB/s end to end); village peak RSS (VmHWM) {:.1} MiB",
        imported.as_secs_f64(),
        sent.as_secs_f64(),
        slide_mib as f64 / (sent - imported).as_secs_f64(),
        status_kib(village_pid, "VmHWM:") as f64 / 1024.0
    );
    let size = std::fs::metadata(&bin)?.len();
    println!("binary {}: {:.1} MiB as built", bin.display(), size as f64 / 1048576.0);
    Ok(())
}
