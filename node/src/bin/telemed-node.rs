//! `telemed-node`: the federation node's command line.

use clap::{Parser, Subcommand};

/// A node of the seven-tier telemedicine federation.
#[derive(Parser)]
#[command(name = "telemed-node", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the seven-tier demo federation and narrate each case's life.
    ///
    /// Today the demo runs the real escalation cores in one process with simulated
    /// time; the networked demo (QUIC, SQLite) comes with the data-plane issue.
    Demo {
        /// Seed for the demo run (the same seed gives the same run).
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo { seed } => print!("{}", node::demo::run(seed)),
    }
    Ok(())
}
