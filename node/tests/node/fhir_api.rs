//! The FHIR R4 API of a hub over real HTTP: a village sends an imaging case to a
//! county hub whose experts read it; the county serves the consult, its task, the
//! report, its observations and the audit log as FHIR resources. Every resource
//! fetched is validated by an independent FHIR R4 library (Python `fhir.resources`
//! 6.1.0, FHIR 4.0.1, installed by scripts/deps/python-fhir.sh); the test fails if
//! Python or the library is missing.

use federation_proto::{Modality, Tier};
use node::demo::{PlannedNode, provision};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "fhir-test-token-0123456789abcdef";
/// A registered client (ADR 0008) that may read consults and reports, not the audit log.
const ENGINE_TOKEN: &str = "engine-token-fedcba9876543210";

/// The clients file: the engine's token as a SHA-256 digest, with its scopes.
fn clients_file(dir: &std::path::Path) -> std::path::PathBuf {
    use sha2::Digest;
    let path = dir.join("fhir-clients.toml");
    let digest = hex::encode(sha2::Sha256::digest(ENGINE_TOKEN.as_bytes()));
    std::fs::write(
        &path,
        format!(
            "[[client]]\nid = \"his-engine\"\ntoken_sha256 = \"{digest}\"\n\
             scopes = [\"system/ServiceRequest.rs\", \"system/Task.rs\", \"system/DiagnosticReport.rs\", \"system/Observation.rs\"]\n"
        ),
    )
    .unwrap();
    path
}

/// A minimal HTTP/1.1 GET (one request per connection): status, content type, body.
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/fhir+json\r\n{auth}Connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await.unwrap().unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    (status, content_type, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

pub(crate) fn python() -> PathBuf {
    let venv = std::env::var_os("TELEMED_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py-venv"));
    let py = venv.join("bin/python");
    assert!(py.exists(), "no FHIR validator at {}: run `bash scripts/deps/python-fhir.sh`", py.display());
    py
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_resources_served_by_a_hub_validate_against_fhir_r4() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let county = "dengfeng.zhengzhou.henan.cn";
    let village = format!("v2.gaocheng.{county}");
    let plan = vec![
        PlannedNode { name: county.into(), tier: Tier::County, parent: None, experts: vec![(Modality::Imaging, 1)] },
        PlannedNode { name: village.clone(), tier: Tier::Village, parent: Some(county.into()), experts: vec![] },
    ];
    let mut configs = provision(dir.path(), &plan).unwrap();
    let token_file = dir.path().join("fhir.token");
    std::fs::write(&token_file, TOKEN).unwrap();
    configs[0].fhir = Some(node::config::FhirConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token_file: Some(token_file.clone()),
        clients_file: Some(clients_file(dir.path())),
        token_lifetime_s: None,
    });
    let hub = node::daemon::start(configs[0].clone()).await.unwrap();
    configs[1].parents = vec![node::config::ParentConfig { name: county.into(), tier: Tier::County, addr: hub.addr }];
    let clinic = node::daemon::start(configs[1].clone()).await.unwrap();
    let fhir = hub.fhir_addr.expect("the hub serves FHIR");

    let id = clinic.submit(super::web::ct_request("p-77")).await.unwrap().unwrap();

    // Task.status follows the case at the hub: in progress, then completed.
    let end = Instant::now() + Duration::from_secs(90);
    let mut statuses = Vec::new();
    loop {
        let (code, _, task) = get(fhir, &format!("/fhir/Task/{id}"), Some(TOKEN)).await;
        if code == 200 {
            let status = task["status"].as_str().unwrap().to_owned();
            if statuses.last() != Some(&status) {
                statuses.push(status.clone());
            }
            if status == "completed" {
                break;
            }
        }
        assert!(Instant::now() < end, "the task never completed: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        statuses.len() >= 2
            && statuses.iter().all(|s| ["received", "ready", "in-progress", "completed"].contains(&s.as_str())),
        "{statuses:?}"
    );

    let out = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut fetch = async |path: String| {
        let (code, content_type, body) = get(fhir, &path, Some(TOKEN)).await;
        assert_eq!(code, 200, "{path}: {body}");
        assert_eq!(content_type, "application/fhir+json", "{path}");
        let file = out.path().join(format!("{}.json", files.len()));
        std::fs::write(&file, body.to_string()).unwrap();
        files.push(file);
        body
    };
    let sr = fetch(format!("/fhir/ServiceRequest/{id}")).await;
    assert_eq!((sr["status"].as_str(), sr["priority"].as_str()), (Some("completed"), Some("urgent")));
    let task = fetch(format!("/fhir/Task/{id}")).await;
    assert_eq!(task["output"][0]["valueReference"]["reference"], format!("DiagnosticReport/{id}"));
    let report = fetch(format!("/fhir/DiagnosticReport/{id}")).await;
    let results = report["result"].as_array().expect("the report has findings").clone();
    for r in &results {
        let obs = fetch(format!("/fhir/{}", r["reference"].as_str().unwrap())).await;
        assert_eq!(obs["resourceType"], "Observation");
    }
    let tasks = fetch("/fhir/Task".into()).await;
    assert_eq!(tasks["total"], 1);
    // Every FHIR read above is an audit record too (fhir.rs): ask for a full page.
    let audit = fetch("/fhir/AuditEvent?_count=1000".into()).await;
    assert!(audit["total"].as_u64().unwrap() >= 3, "{audit}");
    let kinds: Vec<&str> = audit["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["resource"]["subtype"][0]["code"].as_str())
        .collect();
    assert!(kinds.contains(&"case.reported"), "{kinds:?}");

    // A registered client reads what its scopes name, and nothing else.
    let (code, _, body) = get(fhir, &format!("/fhir/Task/{id}"), Some(ENGINE_TOKEN)).await;
    assert_eq!((code, body["resourceType"].as_str()), (200, Some("Task")), "{body}");
    let (code, _, body) = get(fhir, "/fhir/Task", Some(ENGINE_TOKEN)).await;
    assert_eq!((code, body["resourceType"].as_str()), (200, Some("Bundle")), "{body}");

    // Errors: OperationOutcome, 401 without (or with a wrong) token, 403 out of the
    // client's scopes, 404 for unknown ids.
    for (path, token, expected) in [
        (format!("/fhir/Task/{id}"), None, 401),
        (format!("/fhir/Task/{id}"), Some("wrong-token-wrong-token"), 401),
        ("/fhir/AuditEvent".to_owned(), Some(ENGINE_TOKEN), 403),
        ("/fhir/Task/00000000000000000000000000000000".to_owned(), Some(TOKEN), 404),
        ("/fhir/Patient/x".to_owned(), Some(TOKEN), 404),
    ] {
        let (code, content_type, body) = get(fhir, &path, token).await;
        assert_eq!(code, expected, "{path}: {body}");
        assert_eq!(content_type, "application/fhir+json");
        assert_eq!(body["resourceType"], "OperationOutcome", "{path}");
        let file = out.path().join(format!("{}.json", files.len()));
        std::fs::write(&file, body.to_string()).unwrap();
        files.push(file);
    }

    // The independent validator: every resource must parse as FHIR R4.
    let validator = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fhir_validate.py");
    let result = std::process::Command::new(&python).arg(&validator).args(&files).output().unwrap();
    let report = String::from_utf8_lossy(&result.stdout);
    assert!(result.status.success(), "FHIR R4 validation failed:\n{report}{}", String::from_utf8_lossy(&result.stderr));
    assert_eq!(report.lines().filter(|l| l.starts_with("ok ")).count(), files.len(), "{report}");

    // Resources that break R4 are refused by the same validator (it can fail): a
    // Task without its required intent (checked by fhir.resources), a malformed
    // dateTime (likewise), a Task.status outside the required value set.
    let mut no_intent = task.clone();
    no_intent.as_object_mut().unwrap().remove("intent");
    let mut bad_date = task.clone();
    bad_date["authoredOn"] = "yesterday".into();
    let mut bad_status = task.clone();
    bad_status["status"] = "half-done".into();
    for (what, broken) in [("no intent", no_intent), ("bad dateTime", bad_date), ("bad status", bad_status)] {
        let bad = out.path().join("bad.json");
        std::fs::write(&bad, broken.to_string()).unwrap();
        let result = std::process::Command::new(&python).arg(&validator).arg(&bad).output().unwrap();
        assert!(!result.status.success(), "{what}: must fail validation: {}", String::from_utf8_lossy(&result.stdout));
    }

    clinic.shutdown().await.unwrap();
    hub.shutdown().await.unwrap();

    // `telemed-node audit export --format fhir`: the whole verified log as NDJSON
    // AuditEvents, each valid R4, in chain order.
    let config_file = dir.path().join("hub.toml");
    std::fs::write(&config_file, toml::to_string(&configs[0]).unwrap()).unwrap();
    let export = std::process::Command::new(env!("CARGO_BIN_EXE_telemed-node"))
        .args(["audit", "export", "--format", "fhir", "--config"])
        .arg(&config_file)
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let store = node::store::SqliteStore::open_read_only(&configs[0].db_path()).await.unwrap();
    let total = store.verify_audit_chain().await.unwrap();
    let tail = store.audit_tail(node::store::AUDIT_TAIL_MAX).await.unwrap();
    let lines: Vec<serde_json::Value> =
        String::from_utf8(export.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len() as u64, total, "every record exported");
    let mut event_files = Vec::new();
    for (i, (event, record)) in lines.iter().zip(&tail).enumerate() {
        assert_eq!(event["resourceType"], "AuditEvent");
        assert_eq!(event["id"], format!("audit-{}", record.seq));
        assert_eq!(event["subtype"][0]["code"], record.kind.as_str());
        let file = out.path().join(format!("audit-{i}.json"));
        std::fs::write(&file, event.to_string()).unwrap();
        event_files.push(file);
    }
    let result = std::process::Command::new(&python).arg(&validator).args(&event_files).output().unwrap();
    assert!(result.status.success(), "exported AuditEvents invalid:\n{}", String::from_utf8_lossy(&result.stdout));

    // `--format atna --syslog-udp`: the same records as DICOM PS3.15 A.5 audit
    // messages on stdout, and as RFC 5424 syslog datagrams to a loopback receiver.
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let syslog_addr = receiver.local_addr().unwrap();
    // Received while the export runs: a loopback socket's default buffer (208 KiB)
    // holds only about fifty of these datagrams, and a receiver thread on a busy
    // 2-core machine can stall for tens of milliseconds (a CI run lost one of 68
    // sent back to back). The sender paces datagrams (RFC 5426 §3.6); at the 200 a
    // second the test asks for, the receiver may stall for about 170 ms (34
    // datagrams past the burst of 16) before the buffer drops one.
    let received = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = receiver.recv(&mut buf) {
            got.push(buf[..n].to_vec());
            receiver.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        }
        got
    });
    let export = std::process::Command::new(env!("CARGO_BIN_EXE_telemed-node"))
        .args(["audit", "export", "--format", "atna", "--syslog-udp-rate", "200", "--syslog-udp"])
        .arg(syslog_addr.to_string())
        .arg("--config")
        .arg(&config_file)
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let messages: Vec<String> = String::from_utf8(export.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(messages.len() as u64, total, "every record exported");
    let mut xml_files = Vec::new();
    for (i, (xml, record)) in messages.iter().zip(&tail).enumerate() {
        let file = out.path().join(format!("atna-{i}.xml"));
        std::fs::write(&file, xml).unwrap();
        // The A.5 structure, read by a real XML parser (libxml2's xmllint).
        for (xpath, want) in [
            (
                "count(/AuditMessage/EventIdentification/EventID[@csd-code and @codeSystemName='DCM' and @originalText])",
                "1",
            ),
            (
                "count(/AuditMessage/EventIdentification[@EventActionCode and @EventDateTime and @EventOutcomeIndicator])",
                "1",
            ),
            ("count(/AuditMessage/ActiveParticipant[@UserID and @UserIsRequestor]/RoleIDCode[@csd-code])>=1", "true"),
            ("count(/AuditMessage/AuditSourceIdentification[@AuditSourceID]/AuditSourceTypeCode[@csd-code='4'])", "1"),
            ("string(/AuditMessage/EventIdentification/EventTypeCode/@csd-code)", record.kind.as_str()),
            (
                "count(/AuditMessage/ParticipantObjectIdentification[@ParticipantObjectID and @ParticipantObjectTypeCode]/ParticipantObjectDetail)",
                "5",
            ),
        ] {
            let got = std::process::Command::new("xmllint")
                .args(["--xpath", xpath])
                .arg(&file)
                .output()
                .expect("xmllint must be installed (scripts/deps/privacy.sh)");
            assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), want, "{xpath} in {xml}");
        }
        xml_files.push(file);
    }
    let parsed = std::process::Command::new("xmllint").arg("--noout").args(&xml_files).output().unwrap();
    assert!(parsed.status.success(), "{}", String::from_utf8_lossy(&parsed.stderr));
    let datagrams = received.join().unwrap();
    assert_eq!(datagrams.len(), messages.len(), "one syslog datagram per record");
    for (xml, datagram) in messages.iter().zip(&datagrams) {
        let text = std::str::from_utf8(datagram).unwrap();
        let (header, body) = text.split_once('\u{feff}').expect("the BOM before the XML");
        assert!(header.starts_with("<85>1 ") && header.ends_with(" telemed-node - IHE+RFC-3881 - "), "{header}");
        assert_eq!(body, format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>{xml}"), "datagrams in chain order");
    }
}
