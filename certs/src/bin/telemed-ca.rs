//! `telemed-ca`: the network administrator's certificate authority tool.
//!
//! A thin command-line shell over [`certs::ca`], [`certs::enrol`] and
//! [`certs::inspect`]: argument parsing and printing only, no PKI logic of its own.

use anyhow::Context;
use certs::ca::{CertificateAuthority, IntermediateOptions, RevokeReason, RootOptions, Validity};
use certs::profile::{self, Serial};
use certs::{enrol, inspect, keys};
use clap::{Parser, Subcommand};
use federation_proto::{NodeName, Tier};
use std::path::PathBuf;

/// Certificate authority of the telemedicine federation: roots, intermediates, node
/// certificates from CSRs, revocation lists.
#[derive(Debug, Parser)]
#[command(name = "telemed-ca", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the federation root CA in a new directory (ca.key, ca.pem, chain.pem, index.json).
    Init {
        /// Directory for the root CA; created if missing, must not hold a CA yet.
        #[arg(long)]
        dir: PathBuf,
        /// Federation name, e.g. `cn` (the root is named "NAME federation root").
        #[arg(long)]
        name: String,
        /// Limit the whole federation to a region (name suffix); empty = no limit.
        #[arg(long, default_value = "")]
        region: String,
        /// Tier claim of the root; omitted = it may certify every tier.
        #[arg(long)]
        tier: Option<Tier>,
        /// Validity in days.
        #[arg(long, default_value_t = profile::ROOT_VALIDITY_DAYS)]
        days: u32,
    },
    /// Issue an intermediate CA limited to a region and to tiers below its own.
    Intermediate {
        /// Directory of the issuing CA.
        #[arg(long)]
        ca: PathBuf,
        /// Directory for the new CA; created if missing, must not hold a CA yet.
        #[arg(long)]
        out: PathBuf,
        /// Region it may issue in, e.g. `henan.cn`; must lie inside the issuer's.
        #[arg(long)]
        region: String,
        /// Its tier, e.g. `provincial`: it may certify only lower tiers.
        #[arg(long)]
        tier: Tier,
        /// Common name (default "REGION TIER CA SERIAL-PREFIX").
        #[arg(long)]
        name: Option<String>,
        /// Validity in days.
        #[arg(long, default_value_t = profile::INTERMEDIATE_VALIDITY_DAYS)]
        days: u32,
        /// Maximum number of CA levels below it (default: as many as its tier allows).
        #[arg(long)]
        path_len: Option<u8>,
    },
    /// Generate a node key (node.key, mode 0600) and a CSR (node.csr) in a directory.
    Keygen {
        /// The node's hierarchical name, e.g. `v017.gaocheng.dengfeng.zhengzhou.henan.cn`.
        #[arg(long)]
        name: String,
        /// The tier the node asks for.
        #[arg(long)]
        tier: Tier,
        /// Directory for node.key and node.csr; neither may exist yet.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a node's CSR: checks region, tier and the CSR's signature first.
    Sign {
        /// Directory of the issuing CA.
        #[arg(long)]
        ca: PathBuf,
        /// The node's CSR (PEM).
        #[arg(long)]
        csr: PathBuf,
        /// The approved tier; must match the CSR's request and be below the CA's tier.
        #[arg(long)]
        tier: Tier,
        /// Output: node certificate followed by the intermediates (what the node presents).
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = profile::NODE_VALIDITY_DAYS)]
        days: u32,
    },
    /// Print what a certificate, chain, CSR or CRL file claims.
    Inspect {
        /// A PEM file.
        file: PathBuf,
    },
    /// Revoke a certificate this CA issued (takes effect with the next CRL).
    Revoke {
        /// Directory of the issuing CA.
        #[arg(long)]
        ca: PathBuf,
        /// Serial number in hex (as printed by `sign` and `inspect`; colons allowed).
        #[arg(long)]
        serial: Serial,
        /// Reason code.
        #[arg(long, value_enum, default_value_t = RevokeReason::Unspecified)]
        reason: RevokeReason,
    },
    /// Write a signed CRL of every revocation, followed by the CA's chain.
    Crl {
        /// Directory of the issuing CA.
        #[arg(long)]
        ca: PathBuf,
        /// Output file (replaced atomically if it exists).
        #[arg(long)]
        out: PathBuf,
        /// Days until the CRL's nextUpdate.
        #[arg(long, default_value_t = certs::ca::CRL_VALIDITY_DAYS)]
        days: u32,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // The whole cause chain on one line; no backtrace for an operator's mistake.
            eprintln!("telemed-ca: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { dir, name, region, tier, days } => {
            let options = RootOptions { name, region, tier, validity: Validity::Days(days) };
            let ca = CertificateAuthority::init_root(&dir, &options)
                .with_context(|| format!("creating the federation root in `{}`", dir.display()))?;
            println!("created federation root `{}` in {}", ca.summary().subject, dir.display());
            println!("  distribute {} to every node as the federation root", dir.join("ca.pem").display());
            println!("  keep {} secret (mode 0600)", dir.join("ca.key").display());
        }
        Command::Intermediate { ca, out, region, tier, name, days, path_len } => {
            let mut issuer = open(&ca)?;
            let options = IntermediateOptions { region, tier, name, validity: Validity::Days(days), path_len };
            let sub = issuer
                .issue_intermediate(&out, &options)
                .with_context(|| format!("issuing an intermediate CA into `{}`", out.display()))?;
            let s = sub.summary();
            println!("issued intermediate CA `{}` in {}", s.subject, out.display());
            println!("  region {}, tier {tier}, serial {}", sub.region(), s.serial);
        }
        Command::Keygen { name, tier, out } => {
            let name = NodeName::new(name);
            let (key, csr) = enrol::write_key_and_csr(&out, &name, tier)
                .with_context(|| format!("generating the key and CSR of `{name}`"))?;
            println!("wrote {} (mode 0600) and {}", key.display(), csr.display());
            println!("  send {} to your CA; keep the key on this node", csr.display());
        }
        Command::Sign { ca, csr, tier, out, days } => {
            if out.exists() {
                // Checked before signing, so no serial is issued that nobody receives.
                return Err(certs::CaError::AlreadyExists { path: out }.into());
            }
            let mut issuer = open(&ca)?;
            let csr_pem = keys::read_to_string(&csr)?;
            let issued = issuer
                .sign_csr(&csr_pem, tier, Validity::Days(days))
                .with_context(|| format!("signing `{}`", csr.display()))?;
            keys::write_public_file(&out, &issued.chain_pem)?;
            println!("issued `{}` ({}) serial {}", issued.name, issued.tier, issued.serial);
            println!("  valid {} .. {}", fmt_time(issued.not_before), fmt_time(issued.not_after));
            println!("  wrote {}", out.display());
        }
        Command::Inspect { file } => {
            let text = keys::read_to_string(&file)?;
            let now_s = time::OffsetDateTime::now_utc().unix_timestamp();
            let report = inspect::inspect_pem(&text, now_s).with_context(|| format!("reading `{}`", file.display()))?;
            print!("{report}");
        }
        Command::Revoke { ca, serial, reason } => {
            let mut issuer = open(&ca)?;
            issuer.revoke(&serial, reason).with_context(|| format!("revoking serial {serial}"))?;
            println!("revoked serial {serial} ({reason}); publish a new CRL with `telemed-ca crl`");
        }
        Command::Crl { ca, out, days } => {
            let mut issuer = open(&ca)?;
            let pem = issuer.crl(days).context("signing the CRL")?;
            keys::replace_file(&out, &pem)?;
            println!(
                "wrote CRL number {} with {} revoked serial(s) to {}",
                issuer.index().next_crl_number - 1,
                issuer.index().revoked.len(),
                out.display()
            );
        }
    }
    Ok(())
}

fn open(dir: &std::path::Path) -> anyhow::Result<CertificateAuthority> {
    CertificateAuthority::open(dir).with_context(|| format!("opening the CA in `{}`", dir.display()))
}

fn fmt_time(t: time::OffsetDateTime) -> String {
    profile::format_time_s(t.unix_timestamp())
}
