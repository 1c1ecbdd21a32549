//! The FHIR API's OAuth 2.0 client-credentials grant over real HTTP (ADR 0011):
//! clients registered with the real `telemed-node fhir client add` command get
//! short-lived access tokens from `POST /fhir/auth/token`, read what their scopes
//! allow, get 401 once the token expires or the client is revoked (by the real
//! `fhir client revoke`, picked up by the running hub), and every request lands
//! in the hub's hash-chained audit log with the client id and outcome, as valid
//! FHIR R4 AuditEvents (checked by `fhir.resources`, scripts/deps/python-fhir.sh).

use federation_proto::Tier;
use node::daemon::SubmitRequest;
use node::demo::{PlannedNode, provision};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Reply {
    status: u16,
    head: String,
    body: serde_json::Value,
}

/// One HTTP/1.1 request per connection.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, String)], body: &str) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await.unwrap().unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply { status, head: head.to_ascii_lowercase(), body: serde_json::from_str(body).unwrap_or_default() }
}

async fn get(addr: SocketAddr, path: &str, token: &str) -> Reply {
    http(addr, "GET", path, &[("Authorization", format!("Bearer {token}"))], "").await
}

/// RFC 4648 base64 (written here, independent of the node's).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

const FORM: &str = "application/x-www-form-urlencoded";

/// A token request authenticated with HTTP Basic.
async fn token_basic(addr: SocketAddr, id: &str, secret: &str, form: &str) -> Reply {
    let basic = base64(format!("{id}:{secret}").as_bytes());
    let headers = [("Content-Type", FORM.to_owned()), ("Authorization", format!("Basic {basic}"))];
    http(addr, "POST", "/fhir/auth/token", &headers, form).await
}

fn cli(args: &[&str], file: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_telemed-node"))
        .args(args)
        .arg("--clients-file")
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_tokens_expire_die_on_revocation_and_every_request_is_audited() {
    let python = super::fhir_api::python();
    let dir = tempfile::tempdir().unwrap();
    let clients = dir.path().join("fhir-clients.toml");
    let engine = cli(
        &["fhir", "client", "add", "his-engine", "--scope", "system/Task.rs", "--scope", "system/ServiceRequest.r"],
        &clients,
    );
    let auditor = cli(&["fhir", "client", "add", "audit-tool", "--scope", "system/AuditEvent.s"], &clients);
    assert_eq!((engine.len(), auditor.len()), (64, 64), "a 256-bit secret in hex");
    let stored = std::fs::read_to_string(&clients).unwrap();
    assert!(!stored.contains(&engine) && !stored.contains(&auditor), "only digests are stored");
    let listed = cli(&["fhir", "client", "list"], &clients);
    assert!(listed.contains("his-engine") && listed.contains("system/ServiceRequest.r"), "{listed}");

    let county = "dengfeng.zhengzhou.henan.cn";
    let village = format!("v3.gaocheng.{county}");
    let plan = vec![
        PlannedNode { name: county.into(), tier: Tier::County, parent: None, experts: vec![] },
        PlannedNode { name: village.clone(), tier: Tier::Village, parent: Some(county.into()), experts: vec![] },
    ];
    let mut configs = provision(dir.path(), &plan).unwrap();
    const LIFETIME_S: u64 = 3;
    configs[0].fhir = Some(node::config::FhirConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token_file: None,
        clients_file: Some(clients.clone()),
        token_lifetime_s: Some(LIFETIME_S),
    });
    let hub = node::daemon::start(configs[0].clone()).await.unwrap();
    configs[1].parents = vec![node::config::ParentConfig { name: county.into(), tier: Tier::County, addr: hub.addr }];
    let clinic = node::daemon::start(configs[1].clone()).await.unwrap();
    let fhir = hub.fhir_addr.unwrap();

    let patient_id = "410102198001011234";
    let id = clinic
        .submit(SubmitRequest {
            details: node::daemon::PatientDetails { name: "Zhang^Wei".into(), ..Default::default() },
            ..super::web::ct_request(patient_id)
        })
        .await
        .unwrap()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while hub.show(id).await.unwrap().is_none() {
        assert!(Instant::now() < end, "the case never reached the hub");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Discovery needs no token: the CapabilityStatement and SMART configuration
    // name the token endpoint.
    let meta = http(fhir, "GET", "/fhir/metadata", &[], "").await;
    assert_eq!(meta.status, 200);
    let token_url = format!("http://{fhir}/fhir/auth/token");
    assert_eq!(meta.body["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"], token_url.as_str());
    let smart = http(fhir, "GET", "/fhir/.well-known/smart-configuration", &[], "").await;
    assert_eq!(smart.body["token_endpoint"], token_url.as_str());
    assert_eq!(smart.body["grant_types_supported"][0], "client_credentials");

    // The grant: Basic authentication, a scope within the registered ones.
    let t = token_basic(fhir, "his-engine", &engine, "grant_type=client_credentials&scope=system%2FTask.rs").await;
    assert_eq!(t.status, 200, "{}", t.body);
    assert!(t.head.contains("cache-control: no-store"), "{}", t.head);
    assert_eq!((t.body["token_type"].as_str(), t.body["expires_in"].as_u64()), (Some("Bearer"), Some(LIFETIME_S)));
    assert_eq!(t.body["scope"], "system/Task.rs");
    let access = t.body["access_token"].as_str().unwrap().to_owned();
    let issued_at = Instant::now();
    let r = get(fhir, &format!("/fhir/Task/{id}"), &access).await;
    assert_eq!((r.status, r.body["resourceType"].as_str()), (200, Some("Task")), "{}", r.body);
    // Registered but not asked for: ServiceRequest is out of this token's scope.
    assert_eq!(get(fhir, &format!("/fhir/ServiceRequest/{id}"), &access).await.status, 403);
    assert_eq!(get(fhir, "/fhir/AuditEvent", &access).await.status, 403);

    // RFC 6749 §5.2 errors, as JSON.
    let bad = token_basic(fhir, "his-engine", "not-the-secret", "grant_type=client_credentials").await;
    assert_eq!((bad.status, bad.body["error"].as_str()), (401, Some("invalid_client")));
    assert!(bad.head.contains("www-authenticate: basic"), "{}", bad.head);
    let bad = token_basic(fhir, "his-engine", &engine, "grant_type=password&username=x&password=y").await;
    assert_eq!((bad.status, bad.body["error"].as_str()), (400, Some("unsupported_grant_type")));
    let bad = token_basic(fhir, "his-engine", &engine, "grant_type=client_credentials&scope=system/AuditEvent.s").await;
    assert_eq!((bad.status, bad.body["error"].as_str()), (400, Some("invalid_scope")));
    let huge = format!("grant_type=client_credentials&scope={}", "x".repeat(node::fhir_oauth::TOKEN_REQUEST_BYTES_MAX));
    let bad = token_basic(fhir, "his-engine", &engine, &huge).await;
    assert_eq!(bad.status, 413, "{}", bad.body);
    // client_secret_post works too.
    let form = format!("grant_type=client_credentials&client_id=his-engine&client_secret={engine}");
    let post = http(fhir, "POST", "/fhir/auth/token", &[("Content-Type", FORM.to_owned())], &form).await;
    assert_eq!(post.status, 200, "{}", post.body);
    assert_eq!(post.body["scope"], "system/Task.rs system/ServiceRequest.r", "no scope asked: all registered");
    let second = post.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(get(fhir, &format!("/fhir/ServiceRequest/{id}"), &second).await.status, 200);

    // Expired: 401.
    tokio::time::sleep(
        Duration::from_secs(LIFETIME_S).saturating_sub(issued_at.elapsed()) + Duration::from_millis(300),
    )
    .await;
    let r = get(fhir, &format!("/fhir/Task/{id}"), &access).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body["issue"][0]["diagnostics"].as_str().unwrap().contains("expired"), "{}", r.body);

    // Revoked with the CLI while the hub runs: the live token stops working.
    let fresh = token_basic(fhir, "his-engine", &engine, "grant_type=client_credentials").await;
    let fresh = fresh.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(get(fhir, &format!("/fhir/Task/{id}"), &fresh).await.status, 200);
    cli(&["fhir", "client", "revoke", "his-engine"], &clients);
    let revoked_at = Instant::now();
    loop {
        let status = get(fhir, &format!("/fhir/Task/{id}"), &fresh).await.status;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(revoked_at.elapsed() < Duration::from_secs(LIFETIME_S), "the revoked client's token still works");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("revocation took effect after {:?}", revoked_at.elapsed());
    let again = token_basic(fhir, "his-engine", &engine, "grant_type=client_credentials").await;
    assert_eq!((again.status, again.body["error"].as_str()), (401, Some("invalid_client")));

    // The audit log, read by the auditor client: every request above, by client.
    let t = token_basic(fhir, "audit-tool", &auditor, "grant_type=client_credentials").await;
    let audit_token = t.body["access_token"].as_str().unwrap().to_owned();
    let log = get(fhir, "/fhir/AuditEvent?_count=1000", &audit_token).await;
    assert_eq!(log.status, 200);
    let events: Vec<serde_json::Value> =
        log.body["entry"].as_array().unwrap().iter().map(|e| e["resource"].clone()).collect();
    let fhir_events: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["subtype"][0]["code"].as_str().unwrap_or("").starts_with("fhir.")).collect();
    let described = |kind: &str, text: &str| {
        fhir_events
            .iter()
            .any(|e| e["subtype"][0]["code"] == kind && e["outcomeDesc"].as_str().is_some_and(|d| d.contains(text)))
    };
    let task = format!("Task/{id}");
    assert!(described("fhir.token", "client his-engine: access token issued, scope system/Task.rs"));
    assert!(described("fhir.read", &format!("client his-engine: read {task}: 200")));
    assert!(described("fhir.refused", &format!("client his-engine: read ServiceRequest/{id}: 403")));
    assert!(described("fhir.refused", &format!("client ?: read {task}: 401")), "the expired and revoked token");
    assert!(described("fhir.token_refused", "client his-engine: token request refused: invalid_client"));
    assert!(
        described("fhir.token_refused", "invalid_scope") && described("fhir.token_refused", "unsupported_grant_type")
    );
    // The requesting client is the AuditEvent's requestor agent; refusals are failures.
    let read = fhir_events.iter().find(|e| e["subtype"][0]["code"] == "fhir.read").unwrap();
    assert_eq!(read["agent"][1]["who"]["identifier"]["value"], "his-engine");
    assert_eq!(read["agent"][1]["requestor"], true);
    assert_eq!(read["entity"][0]["what"]["identifier"]["value"], id.to_string(), "the case is the entity");
    let refused = fhir_events.iter().find(|e| e["subtype"][0]["code"] == "fhir.refused").unwrap();
    assert_eq!(refused["outcome"], "4");
    // No patient identifier in any audit record.
    let text = log.body.to_string();
    for needle in [patient_id, "Zhang", "Wei"] {
        assert!(!text.contains(needle), "{needle} in the audit log");
    }

    // The AuditEvents of these requests and the CapabilityStatement are valid R4.
    let out = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, v) in fhir_events.iter().copied().chain([&meta.body]).enumerate() {
        let f = out.path().join(format!("{i}.json"));
        std::fs::write(&f, v.to_string()).unwrap();
        files.push(f);
    }
    let validator = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fhir_validate.py");
    let result = std::process::Command::new(&python).arg(&validator).args(&files).output().unwrap();
    assert!(result.status.success(), "invalid FHIR R4:\n{}", String::from_utf8_lossy(&result.stdout));

    clinic.shutdown().await.unwrap();
    hub.shutdown().await.unwrap();
    // The records are in the hash chain, which still verifies.
    let store = node::store::SqliteStore::open_read_only(&configs[0].db_path()).await.unwrap();
    let total = store.verify_audit_chain().await.unwrap();
    let records = store.audit_from(1, 10_000).await.unwrap();
    assert_eq!(records.len() as u64, total);
    let fhir_records = records.iter().filter(|r| r.kind.starts_with("fhir.")).count();
    assert!(fhir_records >= fhir_events.len(), "{fhir_records} < {}", fhir_events.len());
    assert!(records.iter().any(|r| r.kind == "fhir.search" && r.peer.as_deref() == Some("fhir-client:audit-tool")));
}
