//! `telemed-node`: the federation node's daemon and command line.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use federation_proto::{Modality, Tier, Urgency};
use node::config::Config;
use node::control::{self, Request, Response};
use node::daemon::{self, SubmitRequest};
use std::path::PathBuf;

/// A node of the seven-tier telemedicine federation.
#[derive(Parser)]
#[command(name = "telemed-node", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum AuditAction {
    /// Write the audit log as standard audit events to stdout.
    Export {
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
        /// `fhir`: FHIR R4 AuditEvent resources as NDJSON. `atna`: DICOM PS3.15 A.5
        /// audit messages (IHE ATNA), one XML document per line.
        #[arg(long, default_value = "fhir")]
        format: String,
        /// With `--format atna`: also send each message to this audit record
        /// repository as syslog over UDP (RFC 5424 / RFC 5426), e.g. 127.0.0.1:514.
        #[arg(long)]
        syslog_udp: Option<std::net::SocketAddr>,
        /// With `--syslog-udp`: datagrams per second after a first burst of 16 (UDP
        /// has no congestion control; a repository drops what it cannot read in time).
        #[arg(long, default_value_t = node::atna::UDP_DATAGRAMS_PER_SECOND, requires = "syslog_udp",
              value_parser = clap::value_parser!(u32).range(1..=100_000))]
        syslog_udp_rate: u32,
        /// With `--format atna`: also send each message to this audit record
        /// repository (`host:port`) as syslog over TLS (RFC 5425, octet-counted
        /// frames, TLS 1.2+), presenting the node's certificate as the client
        /// certificate (mutual TLS, as IHE ATNA requires). Needs `--syslog-ca`.
        #[arg(long, requires = "syslog_ca")]
        syslog_tls: Option<String>,
        /// The CA certificate(s) (PEM) the repository's certificate must chain to.
        #[arg(long)]
        syslog_ca: Option<PathBuf>,
        /// The name the repository's certificate must carry (default: the host of
        /// `--syslog-tls`).
        #[arg(long)]
        syslog_server_name: Option<String>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon.
    Run {
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
    },
    /// Submit a case from files (at this node, the origin).
    Submit {
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
        #[arg(long)]
        modality: Modality,
        #[arg(long, default_value = "routine")]
        urgency: Urgency,
        /// The clinical question for the reader.
        #[arg(long)]
        question: String,
        /// The patient ID (e.g. ID-card number). Only its pseudonym leaves this node
        /// (see docs/adr/0005-privacy-boundary-at-the-origin.md).
        #[arg(long)]
        patient: String,
        /// The patient's name, birth date, address and phone: kept here and sent only
        /// to tiers the privacy policy allows.
        #[arg(long, default_value = "")]
        patient_name: String,
        #[arg(long, default_value = "")]
        birth_date: String,
        #[arg(long, default_value = "")]
        address: String,
        #[arg(long, default_value = "")]
        phone: String,
        /// Reading task, e.g. `ecg.rhythm` (defaults by modality).
        #[arg(long)]
        task: Option<String>,
        /// A study received from a device (see `studies`), by StudyInstanceUID.
        #[arg(long, required_unless_present = "files")]
        study: Option<String>,
        /// Files: DICOM, WFDB, SVS/TIFF, ...
        files: Vec<PathBuf>,
    },
    /// Studies received from devices (DICOM C-STORE or the inbox) not yet submitted.
    Studies {
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
    },
    /// The audit log: `audit export --format fhir|atna` verifies the hash chain, then
    /// writes every record as a FHIR R4 AuditEvent, one JSON object per line (the
    /// FHIR bulk-data NDJSON format), or as a DICOM PS3.15 A.5 audit message (ATNA)
    /// per line, optionally also sent as syslog over TLS (RFC 5425) or UDP. Reads the store directly (works while the
    /// daemon runs).
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// What this node holds, what is waiting and since when.
    Status {
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A case's report and its full trail.
    Show {
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
        case_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Run the seven-tier demo federation and narrate each case's life.
    Demo {
        /// Run to completion, print a summary table and exit (0 once every case has
        /// its report back). Without it the federation keeps running.
        #[arg(long)]
        headless: bool,
        /// Only the in-process core simulation (no sockets, simulated time).
        #[arg(long)]
        simulated: bool,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// FHIR API clients: `fhir client add|list|revoke` edits `[fhir] clients_file`
    /// (a running node re-reads it within a second).
    Fhir {
        #[command(subcommand)]
        command: FhirCommand,
    },
    /// Web UI accounts (stored in the node's data directory, Argon2id hashes).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Generate this node's Ed25519 key (mode 0600) and a certificate signing
    /// request for the federation CA. The private key never leaves this machine.
    Keygen {
        /// The node's hierarchical name, e.g. `v017.gaocheng.dengfeng.zhengzhou.henan.cn`.
        #[arg(long)]
        name: String,
        /// The node's tier (village, township, county, city, provincial, national, international).
        #[arg(long)]
        tier: Tier,
        /// Directory to write `node.key` and `node.csr` into (refuses to overwrite).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Local AI models: train them reproducibly, or measure their speed.
    #[cfg(feature = "models")]
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// What this build's local models read in a file (label, confidence, version,
    /// and whether it would resolve a case at each urgency's threshold).
    #[cfg(feature = "models")]
    Classify {
        /// Thresholds from this node's `[[models]]` (defaults otherwise).
        #[arg(long)]
        config: Option<PathBuf>,
        file: PathBuf,
    },
}

#[cfg(feature = "models")]
#[derive(Subcommand)]
enum ModelsCommand {
    /// Train a model from its seeded synthetic data plus the training part of the
    /// real recordings, and write its safetensors file (the shipped weights are
    /// exactly what `--seed 1` writes with the repository's testdata/).
    Train {
        /// ecg, imaging or pathology.
        kind: node::models::ModelKind,
        #[arg(long, default_value = "node/models")]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Directory holding the real recordings of DESIGN.md §8 (default: the
        /// repository's testdata/, or $TELEMED_TESTDATA).
        #[arg(long)]
        real_data: Option<PathBuf>,
    },
    /// Measure inference time of the shipped models on this machine.
    Bench {
        #[arg(long, default_value_t = 200)]
        iterations: u32,
    },
}

#[derive(Subcommand)]
enum FhirCommand {
    /// Registered clients of the FHIR API (docs/adr/0011-fhir-oauth-client-credentials.md).
    Client {
        #[command(subcommand)]
        action: FhirClientAction,
        #[arg(long, default_value = "node.toml", global = true)]
        config: PathBuf,
        /// The clients file to edit (default: the config's `[fhir] clients_file`).
        #[arg(long, global = true)]
        clients_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum FhirClientAction {
    /// Register a client and print its secret (once: only its SHA-256 is stored).
    Add {
        name: String,
        /// SMART system scopes, e.g. `--scope system/Task.rs --scope system/DiagnosticReport.r`.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// The registered clients, their scopes, and whether revoked.
    List,
    /// Revoke a client: no new tokens, and those it holds stop working.
    Revoke { name: String },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user (or set an existing user's role and password). The password is
    /// read from standard input (one line), never from the command line.
    Add {
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
        #[arg(long)]
        name: String,
        /// expert (reads this node's consult queue), clinician (submits cases here),
        /// or admin (the admin page).
        #[arg(long)]
        role: node::web::auth::Role,
    },
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TELEMED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,quinn_proto=warn,sqlx=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn fmt_age(ms: u64) -> String {
    let now = node::view::now().0;
    let s = now.saturating_sub(ms) / 1000;
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s / 60)
    } else {
        format!("{} h", s / 3600)
    }
}

async fn ask(config: &std::path::Path, req: Request) -> anyhow::Result<Response> {
    let config = Config::load(config)?;
    control::request(&config.control_socket(), &req)
        .await
        .with_context(|| format!("is the node running? (no answer on {})", config.control_socket().display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logs();
    match Cli::parse().command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            let socket = config.control_socket();
            let running = daemon::start(config).await?;
            control::serve(&socket, running.sender())
                .await
                .with_context(|| format!("control socket {}", socket.display()))?;
            let handle = running.sender();
            tokio::spawn(async move {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                }
                handle.shutdown().await;
            });
            running.wait().await?;
            let _ = std::fs::remove_file(&socket);
        }
        Command::Audit {
            action:
                AuditAction::Export {
                    config,
                    format,
                    syslog_udp,
                    syslog_udp_rate,
                    syslog_tls,
                    syslog_ca,
                    syslog_server_name,
                },
        } => {
            if format != "fhir" && format != "atna" {
                bail!("unknown export format `{format}` (supported: fhir, atna)");
            }
            if (syslog_udp.is_some() || syslog_tls.is_some()) && format != "atna" {
                bail!("--syslog-udp and --syslog-tls send ATNA messages: use them with --format atna");
            }
            let mut syslog =
                syslog_udp.map(|addr| node::atna::SyslogUdp::with_rate(addr, syslog_udp_rate)).transpose()?;
            let loaded = Config::load(&config)?;
            let mut tls = match &syslog_tls {
                Some(addr) => {
                    let ca_path = syslog_ca.as_ref().context("--syslog-tls needs --syslog-ca")?;
                    let ca =
                        std::fs::read_to_string(ca_path).with_context(|| format!("syslog CA {}", ca_path.display()))?;
                    let chain_pem = std::fs::read_to_string(&loaded.tls.chain)
                        .with_context(|| format!("node certificate {}", loaded.tls.chain.display()))?;
                    let key_pem = std::fs::read_to_string(&loaded.tls.key)
                        .with_context(|| format!("node key {}", loaded.tls.key.display()))?;
                    let creds = certs::keys::NodeCredentials::from_pem(&chain_pem, &key_pem)
                        .context("the node's certificate and key (the TLS client certificate)")?;
                    let client = node::atna::tls_client_config(&ca, creds.chain, creds.key)?;
                    Some((addr.clone(), node::atna::connect_tls(addr, syslog_server_name.as_deref(), client).await?))
                }
                None => None,
            };
            let location = loaded.store_location();
            let store = node::store::Store::open_read_only(&location)
                .await
                .with_context(|| format!("cannot open the store at {location}"))?;
            let verified = store.verify_audit_chain().await.context("the audit chain does not verify")?;
            let node_name = loaded.node_name();
            let mut next = 1u64;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            // Up to the last verified record (the daemon may be appending meanwhile).
            while next <= verified {
                let page = store.audit_from(next, (verified - next + 1).min(1_000) as u32).await?;
                let Some(last) = page.last() else { break };
                next = last.seq + 1;
                for record in &page {
                    use std::io::Write;
                    if format == "atna" {
                        writeln!(out, "{}", node::atna::audit_message(record, &node_name))?;
                        if let Some(syslog) = &mut syslog {
                            syslog.send(record, &node_name).await?;
                        }
                        if let Some((addr, stream)) = &mut tls {
                            node::atna::send_tls(stream, addr, &node::atna::syslog_message(record, &node_name)).await?;
                        }
                    } else {
                        writeln!(out, "{}", node::fhir::audit_event(record, &node_name))?;
                    }
                }
            }
            if let Some((addr, stream)) = tls {
                node::atna::close_tls(stream, &addr, std::time::Duration::from_secs(5)).await?;
            }
            eprintln!("exported {} audit records of {} (chain verified)", next - 1, loaded.name);
        }
        Command::Studies { config } => match ask(&config, Request::Studies).await? {
            Response::Studies(list) => {
                println!(
                    "{:<64}  {:<10} {:<12} {:>9} {:>12}  received",
                    "study", "modality", "patient", "instances", "bytes"
                );
                for s in list {
                    println!(
                        "{:<64}  {:<10} {:<12} {:>9} {:>12}  {} ago",
                        s.study_uid,
                        s.modality,
                        s.patient_id,
                        s.instances,
                        s.bytes,
                        fmt_age(s.last_received_ms)
                    );
                }
            }
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer: {other:?}"),
        },
        Command::Submit {
            config,
            modality,
            urgency,
            question,
            patient,
            patient_name,
            birth_date,
            address,
            phone,
            task,
            study,
            files,
        } => {
            let details = node::daemon::PatientDetails { name: patient_name, birth_date, address, phone };
            let files = files
                .into_iter()
                .map(|f| std::fs::canonicalize(&f).with_context(|| format!("{}", f.display())))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let req = SubmitRequest { files, study, modality, urgency, question, patient, task, details };
            match ask(&config, Request::Submit(req)).await? {
                Response::Submitted { case_id } => println!("{case_id}"),
                Response::Error { message } => bail!("not submitted: {message}"),
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Command::Status { config, json } => {
            let loaded = Config::load(&config)?;
            match control::request(&loaded.control_socket(), &Request::Status).await {
                Ok(Response::Status(s)) if json => println!("{}", serde_json::to_string_pretty(&s)?),
                Ok(Response::Status(s)) => {
                    println!(
                        "{} ({})  links up: {}",
                        s.name,
                        s.tier,
                        if s.links.is_empty() {
                            "none".to_owned()
                        } else {
                            s.links.iter().map(|(n, t)| format!("{n} ({t})")).collect::<Vec<_>>().join(", ")
                        }
                    );
                    println!(
                        "{:<32}  {:<8} {:<9} {:<12} {:>8}  where",
                        "case", "urgency", "modality", "status", "since"
                    );
                    for c in s.cases {
                        println!(
                            "{:<32}  {:<8} {:<9} {:<12} {:>8}  {}{}",
                            c.case_id,
                            c.urgency,
                            c.modality,
                            c.status,
                            fmt_age(c.since_ms),
                            c.where_,
                            c.read_by.map(|r| format!(" — read by {r}")).unwrap_or_default()
                        );
                    }
                }
                Ok(Response::Error { message }) => bail!("{message}"),
                Ok(other) => bail!("unexpected answer: {other:?}"),
                Err(_) => {
                    // The daemon is not running: read the store directly (read-only).
                    let location = loaded.store_location();
                    let store = node::store::Store::open_read_only(&location)
                        .await
                        .with_context(|| format!("node not running and no store at {location}"))?;
                    let cases = store.summaries().await?;
                    if json {
                        let lines: Vec<_> = cases.iter().map(|c| serde_json::json!({
                            "case_id": c.id.to_string(), "origin": c.origin.to_string(), "modality": c.modality.to_string(),
                            "urgency": c.urgency.to_string(), "status": c.status, "since_ms": c.updated_at.0,
                            "read_at": c.read_at_node.as_ref().map(|n| n.to_string()),
                        })).collect();
                        println!("{}", serde_json::to_string_pretty(&lines)?);
                    } else {
                        println!("{} — node NOT RUNNING; from its store ({} cases)", loaded.name, cases.len());
                        println!("{:<32}  {:<8} {:<9} {:<12} {:>8}", "case", "urgency", "modality", "status", "since");
                        for c in cases {
                            println!(
                                "{:<32}  {:<8} {:<9} {:<12} {:>8}{}",
                                c.id.to_string(),
                                c.urgency.to_string(),
                                c.modality.to_string(),
                                c.status,
                                fmt_age(c.updated_at.0),
                                c.read_at_node.map(|n| format!("  read at {n}")).unwrap_or_default()
                            );
                        }
                    }
                }
            }
        }
        Command::Show { config, case_id, json } => match ask(&config, Request::Show { case_id }).await? {
            Response::Case(v) if json => println!("{}", serde_json::to_string_pretty(&v)?),
            Response::Case(v) => print!("{}", v.render()),
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer: {other:?}"),
        },
        Command::Demo { headless, simulated, seed } => {
            if simulated {
                print!("{}", node::demo::run(seed));
            } else {
                let ok = node::demo::run_federation(headless).await?;
                if !ok {
                    bail!("not every case got its report back in time");
                }
            }
        }
        Command::User { command: UserCommand::Add { config, name, role } } => {
            let config = Config::load(&config)?;
            eprintln!("password for {name} (one line on standard input):");
            let mut password = String::new();
            std::io::stdin().read_line(&mut password).context("reading the password")?;
            let password = password.trim_end_matches(['\n', '\r']);
            node::web::auth::add_user(&config.data_dir, &name, role, password)?;
            println!(
                "user {name} ({}) saved in {}",
                role.as_str(),
                node::web::auth::users_path(&config.data_dir).display()
            );
        }
        Command::Fhir { command: FhirCommand::Client { action, config, clients_file } } => {
            let file = match clients_file {
                Some(f) => f,
                None => Config::load(&config)?
                    .fhir
                    .and_then(|f| f.clients_file)
                    .context("no [fhir] clients_file in the config (or give --clients-file)")?,
            };
            match action {
                FhirClientAction::Add { name, scopes } => {
                    let secret = node::fhir_auth::add_client(&file, &name, &scopes, node::view::now())
                        .map_err(anyhow::Error::msg)?;
                    eprintln!("client {name} added to {}; its secret (shown only now):", file.display());
                    println!("{secret}");
                }
                FhirClientAction::List => {
                    for c in node::fhir_auth::list_clients(&file).map_err(anyhow::Error::msg)? {
                        let scopes: Vec<String> = c.scopes.iter().map(|s| s.to_string()).collect();
                        let state = if c.revoked { "revoked" } else { "active" };
                        println!(
                            "{:<32} {state:<8} {:<26} {}",
                            c.id,
                            c.added.as_deref().unwrap_or("-"),
                            scopes.join(" ")
                        );
                    }
                }
                FhirClientAction::Revoke { name } => {
                    node::fhir_auth::revoke_client(&file, &name).map_err(anyhow::Error::msg)?;
                    println!("client {name} revoked in {}", file.display());
                }
            }
        }
        Command::Keygen { name, tier, out } => {
            let (key, csr) = certs::enrol::write_key_and_csr(&out, &name.as_str().into(), tier)?;
            println!("wrote {} (private, 0600) and {}", key.display(), csr.display());
            println!("send {} to your CA: telemed-ca sign --csr {} --tier {tier} ...", csr.display(), csr.display());
        }
        #[cfg(feature = "models")]
        Command::Models { command } => match command {
            ModelsCommand::Train { kind, out, seed, real_data } => {
                let real = real_data.unwrap_or_else(node::demo::testdata_dir);
                print!("{}", node::models::cli::train(kind, &out, seed, &real).map_err(anyhow::Error::msg)?)
            }
            ModelsCommand::Bench { iterations } => {
                print!("{}", node::models::cli::bench(iterations).map_err(anyhow::Error::msg)?)
            }
        },
        #[cfg(feature = "models")]
        Command::Classify { config, file } => {
            let config = config.map(|c| Config::load(&c)).transpose()?;
            print!("{}", node::models::cli::classify(&file, config.as_ref()).map_err(anyhow::Error::msg)?)
        }
    }
    Ok(())
}
