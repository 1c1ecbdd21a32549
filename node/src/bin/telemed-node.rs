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
    /// Generate this node's Ed25519 key (mode 0600) and a certificate signing
    /// request for the federation CA. The private key never leaves this machine.
    Keygen {
        /// The node's hierarchical name, e.g. `v017.gaocheng.dengfeng.zhengzhou.henan.cn`.
        #[arg(long)]
        name: String,
        /// The node's tier (village, township, county, city, provincial, national, international).
        #[arg(long)]
        tier: federation_proto::Tier,
        /// Directory to write `node.key` and `node.csr` into (refuses to overwrite).
        #[arg(long, default_value = ".")]
        out: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo { seed } => print!("{}", node::demo::run(seed)),
        Command::Keygen { name, tier, out } => {
            let (key, csr) = certs::enrol::write_key_and_csr(&out, &name.as_str().into(), tier)?;
            println!("wrote {} (private, 0600) and {}", key.display(), csr.display());
            println!("send {} to your CA: telemed-ca sign --csr {} --tier {tier} ...", csr.display(), csr.display());
        }
    }
    Ok(())
}
