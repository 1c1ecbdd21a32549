//! Simulator tests: determinism, invariants under faults, the admin's questions,
//! queueing against Erlang C, scenario errors, and the CLI end to end. Small scales
//! keep the whole file to a few seconds in debug builds.

use simulator::erlang::{erlang_c, fcfs_waits, simulate_mmc_mean_wait};
use simulator::scenario::{Fault, Scenario, erlang_scenario};
use simulator::{Metrics, RunOutcome, run};
use std::path::{Path, PathBuf};
use std::process::Command;

fn scenario_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios").join(name)
}

/// A bundled scenario, shrunk for tests.
fn bundled(name: &str, scale: f64, hours: f64) -> Scenario {
    let mut s = Scenario::from_file(&scenario_path(name)).expect("bundled scenario parses");
    s.topology.scale = scale;
    s.duration_h = hours;
    s
}

fn run_ok(s: Scenario, seed: u64) -> RunOutcome {
    let outcome = run(s, seed).expect("scenario is valid");
    if let Err(e) = outcome.check() {
        panic!("invariants broken: {:#?}", e.violations);
    }
    outcome
}

#[test]
fn same_seed_gives_the_same_trace_hash_and_another_seed_does_not() {
    let a = run_ok(bundled("henan-baseline.toml", 0.01, 12.0), 7).metrics;
    let b = run_ok(bundled("henan-baseline.toml", 0.01, 12.0), 7).metrics;
    let c = run_ok(bundled("henan-baseline.toml", 0.01, 12.0), 8).metrics;
    assert!(a.cases_submitted > 20, "the run must carry cases: {}", a.cases_submitted);
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.turnaround, b.turnaround);
    assert_eq!(a.events_processed, b.events_processed);
    assert_ne!(a.trace_hash, c.trace_hash);
}

/// The traces of small runs, pinned: a change that only makes the engine or the
/// core cheaper (sharing envelopes and records, caching hashes, faster maps) must
/// leave every decision, and so the trace, as it was. These values come from the
/// binary of commit 246dabe (`telemed-sim run simulator/scenarios/NAME.toml --scale
/// 0.01 --hours 12 --seed 7`). A deliberate change of behaviour updates them, and
/// says so in its commit.
#[test]
fn pinned_traces_are_unchanged_by_speed_work() {
    for (name, expected) in [
        ("henan-baseline.toml", "46f70261026836541f20adc9cc0d63ef3f876692aaf935fa3bfc60b874cf90df"),
        // Crashes and restores: exercises the store the engine keeps for faulty nodes.
        ("henan-county-outage.toml", "5fc704b32325efc8223ca41054825a22ab7ddcf1eb889e72a0a653db201a3328"),
        ("henan-township-ecg-model.toml", "acbabcd4e5b5754b420474fb4b3d7c05fb4e4eab73e66c54597080c26d9a5575"),
    ] {
        let m = run_ok(bundled(name, 0.01, 12.0), 7).metrics;
        assert_eq!(m.trace_hash, expected, "trace of {name} changed");
    }
}

#[test]
fn invariants_hold_through_a_county_outage_crash_restarts_and_a_partition() {
    let mut s = bundled("henan-county-outage.toml", 0.01, 12.0);
    // Keep the day-long outage but start it early so it overlaps the arrivals.
    for f in &mut s.faults {
        if let Fault::Outage { start_h, duration_h, .. } = f {
            *start_h = 2.0;
            *duration_h = 24.0;
        }
    }
    let m = run_ok(s, 11).metrics;
    assert!(m.cases_submitted > 50);
    assert_eq!(m.cases_reported_at_origin, m.cases_submitted, "every report must reach its origin");
    // With its county down, its townships reroute to the neighbouring county.
    assert!(m.reroutes > 0, "the outage must cause reroutes");
    let baseline = run_ok(bundled("henan-baseline.toml", 0.01, 12.0), 11).metrics;
    assert_eq!(baseline.reroutes, 0);
}

#[test]
fn crash_restart_of_a_busy_county_loses_no_case() {
    let text = std::fs::read_to_string(scenario_path("henan-baseline.toml")).unwrap()
        + r#"
[[faults]]
kind = "crash_restart"
node = { tier = "county", index = 0 }
at_h = [1.0, 2.5, 4.0, 9.0]
restart_after_min = 3
"#;
    let mut s = Scenario::from_toml(&text, "crash test").unwrap();
    s.topology.scale = 0.005;
    s.duration_h = 10.0;
    let m = run_ok(s, 3).metrics;
    assert_eq!(m.cases_reported_at_origin, m.cases_submitted);
}

#[test]
fn township_ecg_model_reduces_provincial_ecg_load() {
    let base = run_ok(bundled("henan-baseline.toml", 0.01, 24.0), 7).metrics;
    let model = run_ok(bundled("henan-township-ecg-model.toml", 0.01, 24.0), 7).metrics;
    let (b, m) = (base.load_at("provincial", "ecg"), model.load_at("provincial", "ecg"));
    assert!(b > 0, "the baseline must send ECGs to the province");
    assert!(m < b, "township ECG model should relieve the province: {m} vs {b}");
    let township_model_reads: u64 =
        model.resolved.iter().filter(|r| r.tier == "township" && r.modality == "ecg").map(|r| r.by_model).sum();
    assert!(township_model_reads > 0);
}

/// The engine, driving the real core, is an M/M/c queue:
/// (1) case for case, the waits equal a first-come-first-served c-server recursion fed
///     the same arrival and service times (exact, to the millisecond);
/// (2) that recursion over 2 million Poisson/exponential customers gives the Erlang C
///     mean wait within ±2 % (λ = 10/h, μ = 4/h, c = 3: Wq = 21.07 min, ρ = 0.83).
///
/// A direct long run through the real core is `telemed-sim erlang` (see README): at
/// ρ = 0.83 the mean wait needs ~10^6 customers for ±2 % at 95 %, too slow for a test.
#[test]
fn single_node_queue_matches_erlang_c() {
    let (lambda, mu, c) = (10.0, 4.0, 3);
    let closed = erlang_c(lambda, mu, c).unwrap();
    assert!((closed.p_wait - 0.7022).abs() < 1e-4);
    assert!((closed.mean_wait * 60.0 - 21.07).abs() < 0.01);

    let outcome = run_ok(erlang_scenario(lambda, mu, c, 300.0), 5);
    let mut logs = outcome.cases.clone();
    logs.sort_by_key(|l| (l.created_ms, l.queued_ms));
    assert!(logs.len() > 2500, "{} customers", logs.len());
    let engine_waits: Vec<u64> = logs.iter().map(|l| l.claimed_ms.unwrap() - l.queued_ms.unwrap()).collect();
    let replay = fcfs_waits(c as usize, logs.iter().map(|l| (l.queued_ms.unwrap(), l.service_ms)));
    assert_eq!(engine_waits, replay, "the real core plus reading room must behave as FCFS M/M/c");

    let long = simulate_mmc_mean_wait(lambda, mu, c as usize, 2_000_000, 10_000, 5);
    let err = (long - closed.mean_wait) / closed.mean_wait;
    assert!(err.abs() < 0.02, "recursion Wq {:.2} min vs Erlang C {:.2} min", long * 60.0, closed.mean_wait * 60.0);
    // The engine's customers are Poisson/exponential too: their means match the rates.
    let n = logs.len() as f64;
    let service_min = logs.iter().map(|l| l.service_ms).sum::<u64>() as f64 / n / 60_000.0;
    assert!((service_min / (60.0 / mu) - 1.0).abs() < 0.05, "mean service {service_min:.2} min");
    let span_h = (logs.last().unwrap().created_ms - logs[0].created_ms) as f64 / 3.6e6;
    assert!((n / span_h / lambda - 1.0).abs() < 0.05, "arrival rate {:.2}/h", n / span_h);
}

#[test]
fn scenario_errors_name_the_file_and_field() {
    let good = std::fs::read_to_string(scenario_path("henan-baseline.toml")).unwrap();
    let cases = [
        (good.replace("duration_h = 24", "duration_hours = 24"), "duration_hours"),
        (good.replace("tier = \"county\"", "tier = \"prefecture\""), "prefecture"),
        (good.replace("modality = \"ecg\"", "modality = \"eeg\""), "eeg"),
        (good.replace("scale = 0.05", "scale = 0"), "topology.scale"),
        (good.replace("dist = \"beta\", a = 6", "dist = \"beta\", a = -6"), "confidence"),
    ];
    for (text, needle) in cases {
        let err = Scenario::from_toml(&text, "edited.toml").unwrap_err().to_string();
        assert!(err.contains(needle), "error should mention `{needle}`: {err}");
    }
    let manifest = r#"
        name = "m"
        duration_h = 1
        [topology]
        nodes = [{ name = "v1", tier = "village", parent = "t9" }, { name = "t1", tier = "township" }]
        [workload]
        cases_per_origin_per_day = 1
        mix = [{ modality = "ecg", urgency = "stat", task = "ecg.rhythm", weight = 1 }]
    "#;
    let err = run(Scenario::from_toml(manifest, "m.toml").unwrap(), 1).unwrap_err().to_string();
    assert!(err.contains("topology.nodes[0].parent") && err.contains("t9"), "{err}");
    let err = Scenario::from_file(Path::new("/nonexistent/s.toml")).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/s.toml"), "{err}");
}

#[test]
fn explicit_manifest_runs_through_real_cores() {
    let text = r#"
        name = "manifest"
        duration_h = 4
        drain_h = 24
        [topology]
        nodes = [
          { name = "v1.t1.c1", tier = "village", parent = "t1.c1" },
          { name = "v2.t1.c1", tier = "village", parent = "t1.c1" },
          { name = "t1.c1", tier = "township", parent = "c1", alternates = ["c2"] },
          { name = "c1", tier = "county" },
          { name = "c2", tier = "county" },
        ]
        [workload]
        cases_per_origin_per_day = 24
        mix = [{ modality = "ecg", urgency = "urgent", task = "ecg.rhythm", weight = 1, attachment_bytes = [50000] }]
        [[capacity]]
        tier = "county"
        experts = [{ modality = "ecg", on_duty = 1, service_min = { dist = "fixed", value = 5 } }]
        [[faults]]
        kind = "outage"
        node = { name = "c1" }
        start_h = 1
        duration_h = 2
    "#;
    let m = run_ok(Scenario::from_toml(text, "manifest").unwrap(), 2).metrics;
    assert!(m.cases_submitted > 0);
    assert!(m.load_at("county", "ecg") >= m.cases_submitted, "every case reaches a county");
}

#[test]
fn cli_runs_a_scenario_and_compares_two_runs() {
    let dir = std::env::temp_dir().join(format!("telemed-sim-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bin = env!("CARGO_BIN_EXE_telemed-sim");
    let run_cli = |scenario: &str, out: &Path| {
        let o = Command::new(bin)
            .args(["run", scenario_path(scenario).to_str().unwrap(), "--scale", "0.003", "--hours", "4"])
            .args(["--seed", "7", "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let (a, b) = (dir.join("a"), dir.join("b"));
    let out = run_cli("henan-baseline.toml", &a);
    assert!(out.contains("trace hash"), "{out}");
    run_cli("henan-township-ecg-model.toml", &b);
    for f in ["report.html", "metrics.json", "turnaround.csv", "utilisation.csv", "queue.csv", "link_load.csv"] {
        assert!(a.join(f).is_file(), "{f} missing");
    }
    let html = std::fs::read_to_string(a.join("report.html")).unwrap();
    assert!(html.matches("<svg").count() >= 6, "charts are inline SVG");
    assert!(
        !html.contains("<script") && !html.contains("src=\"http") && !html.contains("href=\"http"),
        "self-contained"
    );
    let m = Metrics::from_json(&std::fs::read_to_string(a.join("metrics.json")).unwrap()).unwrap();
    assert!(out.contains(&m.trace_hash));
    let csv = std::fs::read_to_string(a.join("turnaround.csv")).unwrap();
    assert!(csv.starts_with("modality,urgency,cases"));

    let o = Command::new(bin)
        .args(["compare", a.join("metrics.json").to_str().unwrap(), b.join("metrics.json").to_str().unwrap()])
        .args(["--out", dir.join("cmp").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cmp = std::fs::read_to_string(dir.join("cmp/compare.html")).unwrap();
    assert!(cmp.contains("henan-township-ecg-model") && cmp.contains("<svg"));
    assert!(dir.join("cmp/compare.csv").is_file());

    let o = Command::new(bin).args(["run", "/nonexistent.toml", "--out", dir.to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.toml"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The keyed-hash stand-in changes what the signatures cost, not what the cores
/// decide: the same run with real Ed25519 gives the same trace.
#[test]
fn keyed_hash_crypto_gives_the_trace_of_real_ed25519() {
    use simulator::Engine;
    use simulator::crypto::CryptoMode;
    let run_with = |mode| {
        let outcome =
            Engine::new(bundled("henan-baseline.toml", 0.005, 8.0), 5).unwrap().with_crypto(mode).run(&mut |_, _| {});
        outcome.check().unwrap();
        outcome.metrics
    };
    let (fast, real) = (run_with(CryptoMode::KeyedHash), run_with(CryptoMode::Real));
    assert!(fast.cases_submitted > 5);
    assert_eq!(fast.trace_hash, real.trace_hash);
    assert_eq!(fast.turnaround, real.turnaround);
}

/// A township that may skip its county for the city; the county reads ECGs only in
/// hours 0–4. Adverts tell the township when the county has nobody on duty.
fn stale_advert_scenario(adverts: &str) -> Scenario {
    let text = format!(
        r#"
        name = "advert-delay"
        duration_h = 8
        drain_h = 12
        [topology]
        nodes = [
          {{ name = "v1.t1.c1.y1", tier = "village", parent = "t1.c1.y1" }},
          {{ name = "v2.t1.c1.y1", tier = "village", parent = "t1.c1.y1" }},
          {{ name = "t1.c1.y1", tier = "township", parent = "c1.y1", alternates = ["y1"] }},
          {{ name = "c1.y1", tier = "county", parent = "y1" }},
          {{ name = "y1", tier = "city" }},
        ]
        [workload]
        cases_per_origin_per_day = 48
        mix = [{{ modality = "ecg", urgency = "urgent", task = "ecg.rhythm", weight = 1, attachment_bytes = [50000] }}]
        [[capacity]]
        tier = "county"
        experts = [{{ modality = "ecg", shifts = [{{ start_h = 0, end_h = 4, on_duty = 2 }}], service_min = {{ dist = "fixed", value = 5 }} }}]
        [[capacity]]
        tier = "city"
        experts = [{{ modality = "ecg", on_duty = 4, service_min = {{ dist = "fixed", value = 5 }} }}]
        {adverts}
    "#
    );
    Scenario::from_toml(&text, "advert-delay").unwrap()
}

#[test]
fn stale_adverts_send_cases_to_a_county_that_has_gone_off_duty() {
    let none = run_ok(stale_advert_scenario(""), 5).metrics;
    let fresh =
        run_ok(stale_advert_scenario("[adverts]\ninterval_s = 30\nhop_delay_s = 1\nvalidity_s = 600"), 5).metrics;
    let stale =
        run_ok(stale_advert_scenario("[adverts]\ninterval_s = 30\nhop_delay_s = 7200\nvalidity_s = 14400"), 5).metrics;
    for m in [&none, &fresh, &stale] {
        assert_eq!(m.cases_submitted, none.cases_submitted, "same seed, same arrivals");
    }
    let county = |m: &simulator::metrics::Metrics| m.load_at("county", "ecg");
    eprintln!(
        "cases {} through the county: no adverts {}, fresh adverts {}, 2 h stale adverts {}",
        none.cases_submitted,
        county(&none),
        county(&fresh),
        county(&stale)
    );
    // Without adverts every case passes the county, on duty or not.
    assert_eq!(county(&none), none.cases_submitted);
    // Fresh adverts: after the shift ends, the township skips the county (about
    // half the 8 hours of arrivals).
    assert!(county(&fresh) < none.cases_submitted * 3 / 4, "fresh: {} of {}", county(&fresh), none.cases_submitted);
    // Adverts two hours old: the township keeps trusting the county's last shift
    // for two more hours, so more cases take the useless hop through it.
    assert!(
        county(&stale) > county(&fresh) + none.cases_submitted / 8,
        "stale {} vs fresh {} of {}",
        county(&stale),
        county(&fresh),
        none.cases_submitted
    );
}
