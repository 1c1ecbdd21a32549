//! `telemed-sim`: the command line of the topology simulator.
//!
//! `run` simulates one scenario and writes `report.html`, `metrics.json` and CSV
//! tables; `compare` puts two runs' `metrics.json` side by side; `erlang` checks the
//! engine against the M/M/c closed form. Exit status 2 means an invariant broke.
//! This file must never hold simulation logic: it parses arguments and writes files.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use simulator::crypto::CryptoMode;
use simulator::scenario::{Preset, Scenario};
use simulator::{Engine, Metrics, erlang, report};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// mimalloc: a run allocates and frees millions of small records, envelopes and
/// events; the system allocator was a sixth of a run (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its place in mimalloc 3's `mi_option_e`; the
/// test below checks it by its default): how long freed memory waits before it goes
/// back to the OS.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never give freed pages back to the OS (purge delay -1), unless the environment
/// says otherwise (`MIMALLOC_PURGE_DELAY`): a run's memory only grows to its peak,
/// and pages given back were faulted in and zeroed again (the `china` day: ~2 s of
/// system time; docs/benchmarks.md).
fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain store into mimalloc's option table, at the start of `main`
        // before any other thread exists (the call is not thread safe).
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    }
}

#[derive(Parser)]
#[command(name = "telemed-sim", version, about = "Deterministic topology simulator of the telemedicine federation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate a scenario and write report.html, metrics.json and CSV tables.
    Run {
        /// Scenario file (TOML). Optional with --preset.
        scenario: Option<PathBuf>,
        /// Use the bundled baseline scenario with this topology preset (henan, china).
        #[arg(long)]
        preset: Option<String>,
        /// Override the topology scale (fraction of the preset's size).
        #[arg(long)]
        scale: Option<f64>,
        /// Override the hours of arrivals.
        #[arg(long)]
        hours: Option<f64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        /// What the cores sign with: `keyed-hash` (the cheap stand-in, same bytes and
        /// decisions) or `real` (Ed25519, ~10x slower).
        #[arg(long, default_value = "keyed-hash")]
        crypto: String,
    },
    /// Compare two runs (their metrics.json files) side by side.
    Compare {
        a: PathBuf,
        b: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run one node with c experts under Poisson arrivals through the real core and
    /// compare the mean wait with Erlang C.
    Erlang {
        #[arg(long, default_value_t = 10.0)]
        lambda_per_h: f64,
        #[arg(long, default_value_t = 4.0)]
        mu_per_h: f64,
        #[arg(long, default_value_t = 3)]
        servers: u32,
        #[arg(long, default_value_t = 2000.0)]
        hours: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

const HENAN_BASELINE: &str = include_str!("../../scenarios/henan-baseline.toml");
const CHINA_BASELINE: &str = include_str!("../../scenarios/china-baseline.toml");

fn main() -> Result<()> {
    keep_freed_pages();
    match Cli::parse().command {
        Command::Run { scenario, preset, scale, hours, seed, out, crypto } => {
            let crypto = match crypto.as_str() {
                "keyed-hash" => CryptoMode::KeyedHash,
                "real" => CryptoMode::Real,
                other => bail!("unknown --crypto `{other}`: use keyed-hash or real"),
            };
            let mut sc = match (scenario, preset.as_deref()) {
                (Some(path), None) => Scenario::from_file(&path)?,
                (None, Some("henan")) => Scenario::from_toml(HENAN_BASELINE, "bundled henan-baseline.toml")?,
                (None, Some("china")) => Scenario::from_toml(CHINA_BASELINE, "bundled china-baseline.toml")?,
                (Some(path), Some(p)) => {
                    let mut sc = Scenario::from_file(&path)?;
                    sc.topology.preset = Some(parse_preset(p)?);
                    sc.topology.nodes.clear();
                    sc
                }
                (None, Some(p)) => bail!("unknown preset `{p}`: use henan or china"),
                (None, None) => bail!("give a scenario file or --preset"),
            };
            if let Some(s) = scale {
                sc.topology.scale = s;
            }
            if let Some(h) = hours {
                sc.duration_h = h;
            }
            run(sc, seed, &out, crypto)
        }
        Command::Compare { a, b, out } => compare(&a, &b, &out),
        Command::Erlang { lambda_per_h, mu_per_h, servers, hours, seed } => {
            erlang_check(lambda_per_h, mu_per_h, servers, hours, seed)
        }
    }
}

fn parse_preset(p: &str) -> Result<Preset> {
    match p {
        "henan" => Ok(Preset::Henan),
        "china" => Ok(Preset::China),
        _ => bail!("unknown preset `{p}`: use henan or china"),
    }
}

fn progress_bar() -> ProgressBar {
    let target =
        if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(1000), target);
    bar.set_style(
        ProgressStyle::with_template("{spinner} simulated {msg} [{bar:40}] {percent}% ({elapsed} wall)")
            .expect("static template"),
    );
    bar
}

fn run(sc: Scenario, seed: u64, out: &Path, crypto: CryptoMode) -> Result<()> {
    let engine = Engine::new(sc, seed)?.with_crypto(crypto);
    let nodes = engine.topology().len();
    let bar = progress_bar();
    let outcome = engine.run(&mut |now, end| {
        bar.set_position(now * 1000 / end.max(1));
        bar.set_message(format!("{:.1} h", now as f64 / 3.6e6));
    });
    bar.finish_and_clear();
    let m = &outcome.metrics;
    m.write_files(out).with_context(|| format!("writing to {}", out.display()))?;
    std::fs::write(out.join("report.html"), report::run_html(m))?;
    println!("scenario       {}", m.scenario);
    println!("seed           {}", m.seed);
    println!("nodes          {nodes} ({} cores instantiated)", m.cores_created);
    println!("cases          {} submitted, {} reported at origin", m.cases_submitted, m.cases_reported_at_origin);
    println!("events         {} ({:.0}/s)", m.events_processed, m.events_per_wall_s);
    println!("wall time      {:.2} s ({:.0} cases/s)", m.wall_s, m.cases_per_wall_s);
    println!("trace hash     {}", m.trace_hash);
    println!("report         {}", out.join("report.html").display());
    if let Err(e) = outcome.check() {
        for v in &e.violations {
            eprintln!("INVARIANT BROKEN: {v}");
        }
        eprintln!("{e}");
        std::process::exit(2);
    }
    Ok(())
}

fn compare(a: &Path, b: &Path, out: &Path) -> Result<()> {
    let load = |p: &Path| -> Result<Metrics> {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        Metrics::from_json(&text).with_context(|| format!("{} is not a telemed-sim metrics.json", p.display()))
    };
    let (ma, mb) = (load(a)?, load(b)?);
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("compare.html"), report::compare_html(&ma, &mb))?;
    std::fs::write(out.join("compare.csv"), report::compare_csv(&ma, &mb))?;
    std::fs::write(out.join("compare.json"), serde_json::to_string_pretty(&[&ma, &mb])?)?;
    println!("compare        {}", out.join("compare.html").display());
    Ok(())
}

fn erlang_check(lambda: f64, mu: f64, c: u32, hours: f64, seed: u64) -> Result<()> {
    let Some(closed) = erlang::erlang_c(lambda, mu, c) else { bail!("unstable queue: lambda >= c * mu") };
    let sc = simulator::scenario::erlang_scenario(lambda, mu, c, hours);
    let outcome = simulator::run(sc, seed)?;
    outcome.check()?;
    let waits: Vec<f64> =
        outcome.cases.iter().filter_map(|l| Some((l.claimed_ms? - l.queued_ms?) as f64 / 60_000.0)).collect();
    let mean = waits.iter().sum::<f64>() / waits.len().max(1) as f64;
    let waited = waits.iter().filter(|w| **w > 0.0).count() as f64 / waits.len().max(1) as f64;
    println!("M/M/{c} lambda={lambda}/h mu={mu}/h rho={:.3}", closed.utilisation);
    println!("customers      {}", waits.len());
    println!("Erlang C       P(wait)={:.4} Wq={:.2} min", closed.p_wait, closed.mean_wait * 60.0);
    println!("real core      P(wait)={waited:.4} Wq={mean:.2} min",);
    println!("error          {:+.2} %", 100.0 * (mean - closed.mean_wait * 60.0) / (closed.mean_wait * 60.0));
    println!("wall time      {:.2} s", outcome.metrics.wall_s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_mimalloc_reads_from_mimalloc_purge_delay() {
        // SAFETY: reads mimalloc's option table.
        let value = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        match std::env::var("MIMALLOC_PURGE_DELAY") {
            Ok(set) => assert_eq!(value.to_string(), set.trim()),
            // mimalloc 3's default purge delay; the neighbouring options default to 1
            // (eager commit delay) and 0 (NUMA nodes).
            Err(_) => assert_eq!(value, 1000),
        }
    }
}
