//! Closed forms the engine is validated against: the M/M/c queue (Erlang C), plus an
//! independent first-come-first-served c-server recursion (Kiefer–Wolfowitz) that
//! replays given arrivals and service times without any core.
//!
//! The validation has two halves: (1) the engine driving the real core produces, case
//! for case, the waits the FCFS recursion gives for the same arrivals and service
//! times; (2) the recursion, run long with Poisson arrivals and exponential service,
//! matches the Erlang C mean wait. Together they say the engine's queueing is M/M/c.
//! This module must never drive a core; it is pure arithmetic.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Closed-form figures of an M/M/c queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErlangC {
    /// Probability an arrival has to wait.
    pub p_wait: f64,
    /// Mean wait in the queue (hours when the rates are per hour).
    pub mean_wait: f64,
    pub utilisation: f64,
}

/// Erlang C for arrival rate `lambda`, service rate `mu` per server and `c` servers.
/// `None` when the queue is unstable (λ ≥ cμ).
pub fn erlang_c(lambda: f64, mu: f64, c: u32) -> Option<ErlangC> {
    let a = lambda / mu;
    let rho = a / f64::from(c);
    if rho.is_nan() || rho >= 1.0 || c == 0 {
        return None;
    }
    let mut term = 1.0; // a^k / k!
    let mut sum = 0.0;
    for k in 0..c {
        sum += term;
        term *= a / f64::from(k + 1);
    }
    // term is now a^c / c!
    let top = term / (1.0 - rho);
    let p_wait = top / (sum + top);
    Some(ErlangC { p_wait, mean_wait: p_wait / (f64::from(c) * mu - lambda), utilisation: rho })
}

/// Waits of a FCFS queue with `c` servers for customers in arrival order.
pub fn fcfs_waits(c: usize, arrivals_and_services: impl IntoIterator<Item = (u64, u64)>) -> Vec<u64> {
    let mut free_at = vec![0u64; c];
    arrivals_and_services
        .into_iter()
        .map(|(arrive, service)| {
            let (i, &earliest) = free_at.iter().enumerate().min_by_key(|(_, t)| **t).expect("c > 0");
            let start = earliest.max(arrive);
            free_at[i] = start + service;
            start - arrive
        })
        .collect()
}

/// Mean wait (in the rates' time unit) of `customers` through an M/M/c queue, by the
/// FCFS recursion with a seeded RNG; the first `warmup` customers are not counted.
pub fn simulate_mmc_mean_wait(lambda: f64, mu: f64, c: usize, customers: usize, warmup: usize, seed: u64) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut free_at = vec![0f64; c];
    let mut t = 0.0;
    let mut total = 0.0;
    for i in 0..customers + warmup {
        t += -(1.0 - rng.random::<f64>()).ln() / lambda;
        let service = -(1.0 - rng.random::<f64>()).ln() / mu;
        let (k, earliest) = free_at.iter().copied().enumerate().min_by(|a, b| a.1.total_cmp(&b.1)).expect("c > 0");
        let start = earliest.max(t);
        free_at[k] = start + service;
        if i >= warmup {
            total += start - t;
        }
    }
    total / customers as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erlang_c_matches_the_issue_example() {
        let e = erlang_c(10.0, 4.0, 3).unwrap();
        assert!((e.p_wait - 0.7022).abs() < 1e-4, "{e:?}");
        assert!((e.mean_wait * 60.0 - 21.07).abs() < 0.01, "{e:?}");
        assert!(erlang_c(12.0, 4.0, 3).is_none());
    }

    #[test]
    fn fcfs_recursion_waits_for_the_earliest_free_server() {
        // Two servers; three arrivals at 0 with service 10: the third waits 10.
        assert_eq!(fcfs_waits(2, [(0, 10), (0, 10), (0, 10), (25, 1)]), vec![0, 0, 10, 0]);
    }
}
