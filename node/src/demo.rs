//! The seven-tier demo federation, run in one process.
//!
//! Until the data plane lands (issue #4), the demo drives seven real `tiers` cores
//! through the in-memory harness (simulated time, no sockets): a village clinic
//! submits cases, and the demo prints each case's life — model reads, escalation
//! hops with their reasons, custody transfers, the report and its trail.
//! This module must never hold escalation logic; it only configures and narrates.

use federation_proto::{CaseId, HopRecord, Millis, Modality, Reader, Report, Urgency, content_type};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use tiers::harness::{AutoExperts, Harness, ModelScript};
use tiers::{Event, ExpertPool, ModelSpec};

const MIN: u64 = 60_000;

/// Builds the demo federation: a seven-tier chain with an ECG model at the village,
/// an imaging model at the township, and experts from the county up.
pub fn federation(seed: u64) -> Harness {
    let mut h = Harness::seven_tier_chain(seed);
    h.configure("village", |c| {
        c.models = vec![ModelSpec {
            id: "ecg-rhythm".into(),
            version: "0.1.0".into(),
            modality: Modality::Ecg,
            tasks: vec!["ecg.rhythm".into()],
            threshold: [0.95, 0.9, 0.85],
            cases_per_hour: 600,
        }]
    });
    h.node_mut("village").models.insert(
        "ecg-rhythm".into(),
        ModelScript { label: "normal_sinus_rhythm".into(), confidence: 0.97, run_ms: 900 },
    );
    h.configure("township", |c| {
        c.models = vec![ModelSpec {
            id: "img-triage".into(),
            version: "0.1.0".into(),
            modality: Modality::Imaging,
            tasks: vec!["imaging.triage".into()],
            threshold: [0.97, 0.95, 0.9],
            cases_per_hour: 120,
        }]
    });
    h.node_mut("township").models.insert(
        "img-triage".into(),
        ModelScript { label: "possible_consolidation".into(), confidence: 0.62, run_ms: 2_500 },
    );
    let staff: [(&str, Modality, u32); 4] = [
        ("county", Modality::Imaging, 1),
        ("city", Modality::Imaging, 3),
        ("provincial", Modality::Pathology, 2),
        ("national", Modality::Pathology, 4),
    ];
    for (node, modality, on_duty) in staff {
        h.configure(node, |c| c.experts = vec![ExpertPool { modality, on_duty, service_ms: 8 * MIN }]);
        h.node_mut(node).experts =
            Some(AutoExperts { name: format!("dr.{node}"), claim_after_ms: 2 * MIN, read_ms: 6 * MIN });
    }
    h
}

/// Runs the demo and returns its narration.
pub fn run(seed: u64) -> String {
    let mut h = federation(seed);
    let start = h.now;
    let cases = [
        (Modality::Ecg, Urgency::Stat, "palpitations, 12-lead ECG"),
        (Modality::Imaging, Urgency::Stat, "fever and dyspnoea, chest X-ray"),
        (Modality::Pathology, Urgency::Routine, "skin lesion biopsy, margins?"),
    ];
    let mut ids = Vec::new();
    for (modality, urgency, question) in cases {
        ids.push((h.submit("village", modality, urgency, question), question));
        h.run_for(30_000);
    }
    h.run_for(3 * 60 * MIN);

    let mut out = String::new();
    let _ = writeln!(out, "Seven-tier demo federation (in-process cores, simulated time; seed {seed})\n");
    for (id, question) in &ids {
        narrate(&mut out, &h, *id, question, start);
    }
    let problems = h.check_invariants();
    let _ = writeln!(
        out,
        "Invariants (no case lost, none read twice): {}",
        if problems.is_empty() { "hold".to_owned() } else { format!("BROKEN: {problems:?}") }
    );
    out
}

fn narrate(out: &mut String, h: &Harness, id: CaseId, question: &str, start: Millis) {
    let t = |m: Millis| format!("+{:>5.1} min", m.saturating_sub(start) as f64 / 60_000.0);
    let Some(record) = h.case_at("village", id) else { return };
    let info = &record.info;
    let _ = writeln!(out, "Case {id} — {} {} — \"{question}\"", info.urgency, info.modality);
    let _ = writeln!(out, "  deadline {}", t(info.deadline_at));
    for (at, node, event) in h.events.iter().filter(|(_, _, e)| event_case(e) == Some(id)) {
        let line = match event {
            Event::CaseCreated { .. } => "case created and signed".to_owned(),
            Event::ModelRead { model, confidence, decisive, .. } => {
                format!(
                    "model {model} read it, confidence {confidence:.2}{}",
                    if *decisive { " (decisive)" } else { " (not sure)" }
                )
            }
            Event::Queued { .. } => "entered the consult queue".to_owned(),
            Event::Claimed { expert, .. } => format!("claimed by {expert}"),
            Event::Escalating { to, reason, .. } => format!("escalating to {to}: {reason}"),
            Event::CustodyPassed { to, .. } => format!("custody passed to {to} (signed receipt)"),
            Event::Reported { machine_made, .. } => {
                format!("report signed{}", if *machine_made { " (machine-made)" } else { "" })
            }
            Event::ReportReceived { from, .. } => format!("report received from {from}, acknowledged"),
            Event::ReportAtOrigin { .. } => "report is at the clinic".to_owned(),
            _ => continue,
        };
        let _ = writeln!(out, "  {} {node:>13}  {line}", t(*at));
    }
    if let Some(report) = record.report.as_ref().and_then(|r| r.open::<Report>(content_type::REPORT).ok()) {
        let reader = match &report.body.reader {
            Reader::Model { model, version } => format!("model {model} {version}"),
            Reader::Expert { expert } => format!("expert {expert}"),
        };
        let hops: Vec<String> = record
            .trail
            .iter()
            .filter_map(|e| e.open::<HopRecord>(content_type::HOP).ok())
            .map(|v| format!("{}→{}", v.body.from, v.body.to))
            .collect();
        let within = if report.body.signed_at <= info.deadline_at { "within" } else { "PAST" };
        let _ = writeln!(
            out,
            "  => read at {} ({}) by {reader}, {within} deadline; trail: {}\n",
            report.body.node,
            report.body.tier,
            if hops.is_empty() { "none (read locally)".to_owned() } else { hops.join(", ") }
        );
    } else {
        let _ = writeln!(out, "  => no report yet\n");
    }
}

fn event_case(e: &Event) -> Option<CaseId> {
    match e {
        Event::CaseCreated { case_id }
        | Event::CustodyTaken { case_id, .. }
        | Event::ModelRead { case_id, .. }
        | Event::Queued { case_id, .. }
        | Event::Claimed { case_id, .. }
        | Event::ClaimExpired { case_id, .. }
        | Event::Escalating { case_id, .. }
        | Event::CustodyPassed { case_id, .. }
        | Event::Reported { case_id, .. }
        | Event::ReportReceived { case_id, .. }
        | Event::ReportAtOrigin { case_id }
        | Event::Recalled { case_id }
        | Event::ConflictingReport { case_id, .. }
        | Event::NoCapacity { case_id } => Some(*case_id),
        Event::PeerRefused { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_reads_every_case_and_keeps_the_invariants() {
        let text = super::run(7);
        assert_eq!(text.matches("=> read at").count(), 3, "{text}");
        assert!(text.contains("Invariants (no case lost, none read twice): hold"), "{text}");
        assert!(text.contains("machine-made"), "the village ECG model resolves the ECG: {text}");
    }
}

// ---------------------------------------------------------------------------------
// The networked demo: real nodes on loopback QUIC with SQLite stores.
// ---------------------------------------------------------------------------------

/// The demo's web UI accounts (on every node that runs the UI without `--headless`).
pub const DEMO_EXPERT: &str = "expert";
pub const DEMO_CLINICIAN: &str = "clinician";
pub const DEMO_ADMIN: &str = "admin";
/// The demo accounts' password. Demo only: a real node's accounts are made with
/// `telemed-node user add`.
pub const DEMO_PASSWORD: &str = "telemed-demo";

/// One node of the networked demo federation, as planned before it starts.
#[derive(Debug, Clone)]
pub struct PlannedNode {
    pub name: String,
    pub tier: federation_proto::Tier,
    pub parent: Option<String>,
    pub experts: Vec<(Modality, u32)>,
}

/// The demo topology: 1 international, 1 national, 1 provincial, 2 city, 3 county,
/// 4 township and 8 village nodes. ECG experts sit at the Zhengzhou city hub,
/// imaging experts at the Gongyi county hospital and the provincial hub, pathology
/// at the national centre; so cases climb to different heights.
pub fn topology() -> Vec<PlannedNode> {
    use federation_proto::Tier::*;
    let n = |name: &str, tier, parent: Option<&str>, experts: Vec<(Modality, u32)>| PlannedNode {
        name: name.into(),
        tier,
        parent: parent.map(Into::into),
        experts,
    };
    let mut nodes = vec![
        n("hub.telemed.int", International, None, vec![(Modality::Pathology, 2), (Modality::Imaging, 2)]),
        n("nhc.cn", National, Some("hub.telemed.int"), vec![(Modality::Pathology, 2)]),
        n("hub.henan.cn", Provincial, Some("nhc.cn"), vec![(Modality::Imaging, 2)]),
        n("zhengzhou.henan.cn", City, Some("hub.henan.cn"), vec![(Modality::Ecg, 2)]),
        n("luoyang.henan.cn", City, Some("hub.henan.cn"), vec![(Modality::Ecg, 1)]),
        n("dengfeng.zhengzhou.henan.cn", County, Some("zhengzhou.henan.cn"), vec![]),
        n("gongyi.zhengzhou.henan.cn", County, Some("zhengzhou.henan.cn"), vec![(Modality::Imaging, 1)]),
        n("yichuan.luoyang.henan.cn", County, Some("luoyang.henan.cn"), vec![]),
    ];
    let townships = [
        ("gaocheng.dengfeng.zhengzhou.henan.cn", "dengfeng.zhengzhou.henan.cn"),
        ("dajindian.dengfeng.zhengzhou.henan.cn", "dengfeng.zhengzhou.henan.cn"),
        ("zhanjie.gongyi.zhengzhou.henan.cn", "gongyi.zhengzhou.henan.cn"),
        ("baiyang.yichuan.luoyang.henan.cn", "yichuan.luoyang.henan.cn"),
    ];
    for (t, parent) in townships {
        nodes.push(n(t, Township, Some(parent), vec![]));
    }
    for (t, _) in townships {
        for v in ["v01", "v02"] {
            nodes.push(n(&format!("{v}.{t}"), Village, Some(t), vec![]));
        }
    }
    nodes
}

/// Issues certificates for every planned node and writes each node's directory
/// (root.pem, node.pem, node.key, node.toml). Returns the configs, top tier first.
pub fn provision(dir: &std::path::Path, plan: &[PlannedNode]) -> anyhow::Result<Vec<crate::config::Config>> {
    use certs::ca::{CertificateAuthority, IntermediateOptions, RootOptions, Validity};
    use federation_proto::Tier;
    let mut root = CertificateAuthority::init_root(&dir.join("ca/root"), &RootOptions::new("telemed"))?;
    let mut national =
        root.issue_intermediate(&dir.join("ca/national"), &IntermediateOptions::new("cn", Tier::National))?;
    let mut henan =
        national.issue_intermediate(&dir.join("ca/henan"), &IntermediateOptions::new("henan.cn", Tier::Provincial))?;
    let root_pem = root.root_pem();
    let mut configs = Vec::new();
    for p in plan {
        let node_dir = dir.join(&p.name);
        std::fs::create_dir_all(&node_dir)?;
        let (key_pem, csr_pem) = certs::enrol::generate_key_and_csr(&p.name.as_str().into(), p.tier)?;
        let ca = match p.tier {
            Tier::International | Tier::National => &mut root,
            Tier::Provincial => &mut national,
            _ => &mut henan,
        };
        let issued = ca.sign_csr(&csr_pem, p.tier, Validity::Days(30))?;
        std::fs::write(node_dir.join("root.pem"), &root_pem)?;
        std::fs::write(node_dir.join("node.pem"), &issued.chain_pem)?;
        certs::keys::write_secret_file(&node_dir.join("node.key"), &key_pem)?;
        configs.push(crate::config::Config {
            name: p.name.clone(),
            tier: p.tier,
            data_dir: node_dir.join("data"),
            listen: "127.0.0.1:0".parse()?,
            parents: Vec::new(), // filled in once parents are listening
            cross_links: if p.tier == Tier::International { vec!["nhc.cn".into()] } else { vec![] },
            tls: crate::config::TlsConfig {
                root: node_dir.join("root.pem"),
                chain: node_dir.join("node.pem"),
                key: node_dir.join("node.key"),
                crls: vec![],
            },
            experts: p
                .experts
                .iter()
                .map(|(modality, on_duty)| crate::config::ExpertsConfig {
                    modality: *modality,
                    on_duty: *on_duty,
                    service_min: 5,
                })
                .collect(),
            simulated_experts: (!p.experts.is_empty()).then(|| crate::config::SimulatedExperts {
                name: format!("dr.{}", p.name.split('.').next().unwrap_or("x")),
                claim_after_ms: 800,
                read_ms: 1_500,
            }),
            metrics: None,
            rate_limit_bytes_per_s: None,
            dicom: None,
            inbox: None,
            web: None,
            audit: None,
            store: None,
            privacy: Default::default(),
            fhir: None,
            control: Some(crate::control_plane::ControlConfig::loopback()),
            models: Vec::new(),
        });
    }
    Ok(configs)
}

/// The sample files shipped in `testdata/` (see testdata/PROVENANCE.md).
pub fn testdata_dir() -> std::path::PathBuf {
    std::env::var_os("TELEMED_TESTDATA")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata"))
}

/// Brings up the demo federation on loopback, submits real sample cases at the
/// villages, and waits for every report. With `headless`, prints a summary table and
/// returns whether every case was reported; otherwise keeps running until Ctrl-C.
pub async fn run_federation(headless: bool) -> anyhow::Result<bool> {
    use crate::daemon::{self, SubmitRequest};
    let tmp = tempfile_dir()?;
    let plan = topology();
    let mut configs = provision(&tmp, &plan)?;
    println!("Seven-tier demo federation: {} nodes on loopback, data in {}", plan.len(), tmp.display());
    if !headless {
        // The web UI on every hub and on two villages, with demo accounts; a person
        // (not a simulated expert) reads the imaging cases that reach the provincial hub.
        let mut villages_with_ui = 0;
        for (p, config) in plan.iter().zip(configs.iter_mut()) {
            let ui = p.tier >= federation_proto::Tier::County
                || (p.tier == federation_proto::Tier::Village && villages_with_ui < 2);
            if !ui {
                continue;
            }
            villages_with_ui += usize::from(p.tier == federation_proto::Tier::Village);
            config.web = Some(crate::config::WebConfig {
                listen: "127.0.0.1:0".parse()?,
                behind_tls_proxy: false,
                upload_bytes_max: 512 * 1024 * 1024,
                session_min: 12 * 60,
            });
            for (user, role) in [
                (DEMO_EXPERT, crate::web::auth::Role::Expert),
                (DEMO_CLINICIAN, crate::web::auth::Role::Clinician),
                (DEMO_ADMIN, crate::web::auth::Role::Admin),
            ] {
                crate::web::auth::add_user(&config.data_dir, user, role, DEMO_PASSWORD)?;
            }
            if p.tier == federation_proto::Tier::Provincial {
                config.simulated_experts = None;
            }
        }
    }
    let mut running: Vec<daemon::Running> = Vec::new();
    let mut addrs: BTreeMap<String, std::net::SocketAddr> = BTreeMap::new();
    let mut control_addrs: BTreeMap<String, String> = BTreeMap::new();
    for (p, config) in plan.iter().zip(configs.iter_mut()) {
        if let Some(parent) = &p.parent {
            let parent_tier = plan.iter().find(|q| &q.name == parent).map(|q| q.tier).expect("parent planned");
            config.parents =
                vec![crate::config::ParentConfig { name: parent.clone(), tier: parent_tier, addr: addrs[parent] }];
        }
        if let (Some(control), Some(parent)) = (config.control.as_mut(), &p.parent) {
            control.bootstrap = control_addrs.get(parent).cloned().into_iter().collect();
        }
        let node = daemon::start(config.clone()).await?;
        addrs.insert(p.name.clone(), node.addr);
        if let Some(a) = node.control_plane.as_ref().and_then(|c| c.bootstrap_addr()) {
            control_addrs.insert(p.name.clone(), a);
        }
        match node.web_addr {
            Some(web) => println!("  {:<14} {:<44} {}  web UI http://{web}/", p.tier.to_string(), p.name, node.addr),
            None => println!("  {:<14} {:<44} {}", p.tier.to_string(), p.name, node.addr),
        }
        running.push(node);
    }
    let data = testdata_dir();
    let samples = [
        ("waveform_ecg.dcm", Modality::Ecg, Urgency::Stat, "palpitations and dizziness: 12-lead ECG"),
        ("CT_small.dcm", Modality::Imaging, Urgency::Urgent, "head injury: CT, bleed?"),
        ("US1_J2KR.dcm", Modality::Imaging, Urgency::Routine, "abdominal pain: ultrasound"),
        ("cmu_small_region.svs", Modality::Pathology, Urgency::Routine, "skin biopsy: margins clear?"),
    ];
    let villages: Vec<usize> =
        plan.iter().enumerate().filter(|(_, p)| p.tier == federation_proto::Tier::Village).map(|(i, _)| i).collect();
    let mut cases = Vec::new();
    for (k, &vi) in villages.iter().enumerate() {
        let (file, modality, urgency, question) = samples[k % samples.len()];
        let req = SubmitRequest {
            study: None,
            files: vec![data.join(file)],
            modality,
            urgency,
            question: question.into(),
            patient: format!("demo-patient-{k:02}"),
            task: None,
            details: Default::default(),
        };
        let id = running[vi].submit(req).await?.map_err(|e| anyhow::anyhow!("submit at {}: {e}", plan[vi].name))?;
        cases.push((vi, id, std::time::Instant::now()));
    }
    println!("Submitted {} cases at {} villages; waiting for reports...", cases.len(), villages.len());
    if !headless {
        println!(
            "Web UI logins (every node with a web UI): {DEMO_EXPERT} / {DEMO_CLINICIAN} / {DEMO_ADMIN}, \
             password `{DEMO_PASSWORD}`. Imaging cases that reach hub.henan.cn wait for you in its consult queue."
        );
    }
    // Without --headless a person reads some cases: do not wait long for them.
    let wait_s = if headless { 180 } else { 30 };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_s);
    let mut done: BTreeMap<CaseId, (crate::view::CaseView, std::time::Duration)> = BTreeMap::new();
    while done.len() < cases.len() && std::time::Instant::now() < deadline {
        for (vi, id, started) in &cases {
            if done.contains_key(id) {
                continue;
            }
            if let Some(view) = running[*vi].show(*id).await?
                && view.report.is_some()
            {
                done.insert(*id, (view, started.elapsed()));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    println!();
    println!(
        "{:<10} {:<9} {:<8} {:<36} {:>4} {:>9}",
        "case", "modality", "urgency", "read at (tier)", "hops", "report in"
    );
    for (vi, id, _) in &cases {
        match done.get(id) {
            Some((v, took)) => {
                let r = v.report.as_ref().expect("reported");
                println!(
                    "{:<10} {:<9} {:<8} {:<36} {:>4} {:>8.1}s",
                    &v.case_id[..8],
                    v.modality,
                    v.urgency,
                    format!("{} ({})", r.node.split('.').next().unwrap_or(""), r.tier),
                    v.trail.len(),
                    took.as_secs_f64()
                );
            }
            None => println!("{:<10} from {} — NO REPORT YET", &id.to_string()[..8], plan[*vi].name),
        }
    }
    let all = done.len() == cases.len();
    if let Some((_, (v, _))) = done.iter().next() {
        println!("\nOne case in full (telemed-node show):\n{}", v.render());
    }
    if !headless {
        let web_of = |name: &str| {
            plan.iter().position(|p| p.name == name).and_then(|i| running[i].web_addr).map(|a| format!("http://{a}/"))
        };
        if let (Some(hub), Some(village)) = (web_of("hub.henan.cn"), web_of("v01.gaocheng.dengfeng.zhengzhou.henan.cn"))
        {
            println!(
                "\nOpen the consult queue of the provincial hub: {hub}  (log in as {DEMO_EXPERT} / {DEMO_PASSWORD})"
            );
            println!(
                "Open the clinic page of a village:            {village}  (log in as {DEMO_CLINICIAN} / {DEMO_PASSWORD})"
            );
            println!("Admin pages: any web UI above, as {DEMO_ADMIN} / {DEMO_PASSWORD}.");
        }
        println!("Federation running; Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
    }
    for node in running.into_iter().rev() {
        let _ = node.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    // Without --headless, cases left for people to read are not a failure.
    Ok(all || !headless)
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("telemed-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
