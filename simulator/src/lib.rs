//! `telemed-sim`: a deterministic topology simulator for network admins. It builds a
//! federation (presets `henan`, `china`, or an explicit manifest), generates case
//! arrivals, models links, faults, models and expert rosters, and drives the real
//! [`tiers::Node`] core under simulated time; then reports utilisation, queues,
//! turnaround, where cases were resolved, deadline misses and link load.
//!
//! Map: [`scenario`] (TOML files) → [`topology`] (who links to whom) → [`engine`]
//! (the discrete-event run over real cores) → [`metrics`] (figures, JSON, CSV) →
//! [`report`] (HTML with charts). [`erlang`] holds the closed forms the engine is
//! validated against.
//!
//! Architecture invariant: this crate never depends on `node` and never copies the
//! core's escalation logic; every decision about a case is made by `tiers`.

pub mod crypto;
pub mod engine;
pub mod erlang;
pub mod fastmap;
pub mod metrics;
pub mod report;
pub mod scenario;
pub mod topology;

pub use engine::{CaseLog, Engine, InvariantError, RunOutcome};
pub use metrics::Metrics;
pub use scenario::{Scenario, ScenarioError};

/// Runs a scenario with a seed, without progress output.
pub fn run(scenario: Scenario, seed: u64) -> Result<RunOutcome, ScenarioError> {
    Ok(Engine::new(scenario, seed)?.run(&mut |_, _| {}))
}
