//! The web UI's security over plain HTTP (no browser): sessions, CSRF, roles,
//! escaping, login rate limiting. Real daemons with real stores on loopback.
//! Also the federation fixture the browser test (`browser.rs`) shares.

use federation_proto::{Modality, Tier, Urgency};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use node::config::{ParentConfig, WebConfig};
use node::daemon::{Running, SubmitRequest};
use node::demo::{PlannedNode, provision};
use node::web::auth::{self, Role};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub const PROVINCIAL: &str = "hub.henan.cn";
pub const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";
pub const VILLAGE: &str = "v1.gaocheng.dengfeng.zhengzhou.henan.cn";
pub const PASSWORD: &str = "correct horse battery";

pub fn web_config() -> WebConfig {
    WebConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        behind_tls_proxy: false,
        upload_bytes_max: 16 * 1024 * 1024,
        session_min: 60,
    }
}

/// A running federation for the UI tests. Nodes are shut down by `stop`.
pub struct Fed {
    pub _dir: tempfile::TempDir,
    /// Top tier first.
    pub nodes: Vec<Running>,
}

impl Fed {
    pub fn web(&self, i: usize) -> SocketAddr {
        self.nodes[i].web_addr.expect("web UI configured")
    }
    pub async fn stop(self) {
        for n in self.nodes {
            n.shutdown().await.unwrap();
        }
    }
}

/// Starts `chain` (top tier first, each the parent of the next) with the web UI on
/// every node. ECG experts (real people, not simulated) at the first node. Users:
/// `dr.wang` (expert), `nurse.chen` (clinician) and `admin` at every node.
pub async fn federation(chain: &[(&str, Tier)]) -> Fed {
    federation_with_experts_at(chain, 0, web_config()).await
}

/// [`federation`] with the ECG experts at `chain[experts_at]` and this web configuration.
pub async fn federation_with_experts_at(chain: &[(&str, Tier)], experts_at: usize, web: WebConfig) -> Fed {
    let dir = tempfile::tempdir().unwrap();
    let plan: Vec<PlannedNode> = chain
        .iter()
        .enumerate()
        .map(|(i, (name, tier))| PlannedNode {
            name: (*name).into(),
            tier: *tier,
            parent: (i > 0).then(|| chain[i - 1].0.into()),
            experts: if i == experts_at { vec![(Modality::Ecg, 2)] } else { vec![] },
        })
        .collect();
    let mut configs = provision(dir.path(), &plan).unwrap();
    let mut nodes: Vec<Running> = Vec::new();
    for (i, config) in configs.iter_mut().enumerate() {
        config.simulated_experts = None; // people read these cases, through the UI
        config.web = Some(web.clone());
        if i > 0 {
            config.parents =
                vec![ParentConfig { name: chain[i - 1].0.into(), tier: chain[i - 1].1, addr: nodes[i - 1].addr }];
        }
        for (name, role) in [("dr.wang", Role::Expert), ("nurse.chen", Role::Clinician), ("admin", Role::Admin)] {
            auth::add_user(&config.data_dir, name, role, PASSWORD).unwrap();
        }
        nodes.push(node::daemon::start(config.clone()).await.unwrap());
    }
    Fed { _dir: dir, nodes }
}

pub fn ecg_request(urgency: Urgency, question: &str) -> SubmitRequest {
    SubmitRequest {
        study: None,
        files: vec![node::demo::testdata_dir().join("waveform_ecg.dcm")],
        modality: Modality::Ecg,
        urgency,
        question: question.into(),
        patient: "p-0042".into(),
        task: None,
        details: Default::default(),
    }
}

/// An urgent imaging case of the real CT_small.dcm for `patient` (question "nodule?").
pub fn ct_request(patient: &str) -> SubmitRequest {
    SubmitRequest {
        study: None,
        files: vec![node::demo::testdata_dir().join("CT_small.dcm")],
        modality: Modality::Imaging,
        urgency: Urgency::Urgent,
        question: "nodule?".into(),
        patient: patient.into(),
        task: None,
        details: Default::default(),
    }
}

/// Waits (bounded) until `node` holds `n` cases in the given status.
pub async fn wait_for_status(node: &Running, status: &str, n: usize) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let snap = node.snapshot().await.unwrap();
        if snap.iter().filter(|c| c.view.status == status).count() >= n {
            return;
        }
        assert!(
            Instant::now() < end,
            "{n} case(s) never became {status}: {:?}",
            snap.iter().map(|c| &c.view.status).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// --- a small HTTP client with a cookie --------------------------------------------------

pub struct Http {
    base: String,
    port: u16,
    client: Client<HttpConnector, Full<Bytes>>,
    pub cookie: Option<String>,
}

pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
    pub bytes: Vec<u8>,
}

impl Answer {
    pub fn location(&self) -> &str {
        self.headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or("")
    }
    /// The first CSRF token in a page's forms.
    pub fn csrf(&self) -> String {
        const MARK: &str = r#"name="csrf" value=""#;
        let at = self.body.find(MARK).expect("a form with a CSRF token") + MARK.len();
        self.body[at..].split('"').next().unwrap().to_owned()
    }
}

pub fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                b' ' => "+".into(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        Http { base: format!("http://{addr}"), port: addr.port(), client, cookie: None }
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Answer {
        self.try_send(method, path, headers, body).await.expect("HTTP exchange")
    }

    /// [`Http::send`], `None` when the server closed the connection before answering
    /// (it may, when it refuses an upload before reading all of it).
    pub async fn try_send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Option<Answer> {
        let mut req = hyper::Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.header("cookie", format!("{}_{}={c}", auth::COOKIE, self.port));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some((ct, bytes)) => {
                req = req.header("content-type", ct);
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        let res = tokio::time::timeout(Duration::from_secs(30), self.client.request(req.body(body).unwrap()))
            .await
            .expect("answer within 30 s")
            .ok()?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        if let Some(set) = headers.get("set-cookie").and_then(|v| v.to_str().ok())
            && let Some(v) = set.strip_prefix(&format!("{}_{}=", auth::COOKIE, self.port))
        {
            let v = v.split(';').next().unwrap_or("");
            self.cookie = (!v.is_empty()).then(|| v.to_owned());
        }
        let bytes = res.into_body().collect().await.unwrap().to_bytes().to_vec();
        let body = String::from_utf8_lossy(&bytes).into_owned();
        Some(Answer { status, headers, body, bytes })
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        self.send("GET", path, &[], None).await
    }

    pub async fn post_form(&mut self, path: &str, pairs: &[(&str, &str)]) -> Answer {
        self.send("POST", path, &[], Some(("application/x-www-form-urlencoded", form(pairs).into_bytes()))).await
    }

    /// Logs in; returns the answer to the login POST.
    pub async fn login(&mut self, name: &str, password: &str) -> Answer {
        let page = self.get("/login").await;
        assert_eq!(page.status, 200);
        let csrf = page.csrf();
        self.post_form("/login", &[("csrf", &csrf), ("name", name), ("password", password)]).await
    }
}

// --- the tests -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_apis_refuse_requests_without_a_session() {
    let fed = federation(&[(PROVINCIAL, Tier::Provincial)]).await;
    let id = fed.nodes[0].submit(ecg_request(Urgency::Stat, "chest pain")).await.unwrap().unwrap();
    let mut http = Http::new(fed.web(0));
    for page in ["/", "/queue", "/clinic", "/admin", &format!("/case/{id}")] {
        let a = http.get(page).await;
        assert_eq!((a.status, a.location()), (303, "/login"), "GET {page} without a session");
    }
    for api in ["/events", &format!("/case/{id}/attachment/0/ecg.svg")] {
        assert_eq!(http.get(api).await.status, 401, "GET {api} without a session");
    }
    for action in ["claim", "release", "sign", "escalate"] {
        let a = http.post_form(&format!("/case/{id}/{action}"), &[("csrf", "x")]).await;
        assert_eq!(a.status, 401, "POST {action} without a session");
    }
    let a = http
        .send("POST", "/clinic/submit", &[], Some(("multipart/form-data; boundary=x", b"--x--\r\n".to_vec())))
        .await;
    assert_eq!(a.status, 401, "upload without a session");
    // A made-up session id is no session.
    http.cookie = Some("ab".repeat(32));
    assert_eq!(http.get("/queue").await.location(), "/login");
    let case = fed.nodes[0].snapshot().await.unwrap();
    assert_eq!(case[0].view.status, "queued", "nothing changed");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookie_is_httponly_samesite_strict_and_random() {
    let fed = federation(&[(PROVINCIAL, Tier::Provincial)]).await;
    let mut http = Http::new(fed.web(0));
    let a = http.login("dr.wang", PASSWORD).await;
    assert_eq!((a.status, a.location()), (303, "/"));
    let set = a.headers.get("set-cookie").unwrap().to_str().unwrap().to_owned();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/"), "{set}");
    assert!(!set.contains("Secure"), "plain HTTP on loopback: a Secure cookie would never be sent back");
    let id = http.cookie.clone().unwrap();
    assert_eq!(id.len(), 64, "256-bit id");
    // A fresh id after login: the login form's session is not reused.
    let mut other = Http::new(fed.web(0));
    other.login("dr.wang", PASSWORD).await;
    assert_ne!(other.cookie.unwrap(), id);
    let page = http.get("/queue").await;
    assert_eq!(page.status, 200);
    for h in ["content-security-policy", "x-content-type-options", "x-frame-options"] {
        assert!(page.headers.contains_key(h), "{h} missing");
    }
    assert!(page.headers["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_without_the_sessions_csrf_token_are_refused() {
    let fed = federation(&[(PROVINCIAL, Tier::Provincial)]).await;
    let id = fed.nodes[0].submit(ecg_request(Urgency::Stat, "chest pain")).await.unwrap().unwrap();
    wait_for_status(&fed.nodes[0], "queued", 1).await;
    let mut http = Http::new(fed.web(0));
    http.login("dr.wang", PASSWORD).await;
    let real = http.get("/queue").await.csrf();
    let claim = format!("/case/{id}/claim");
    assert_eq!(http.post_form(&claim, &[]).await.status, 403, "no token");
    assert_eq!(http.post_form(&claim, &[("csrf", &"0".repeat(64))]).await.status, 403, "wrong token");
    let mut other = Http::new(fed.web(0));
    other.login("dr.wang", PASSWORD).await;
    let others = other.get("/queue").await.csrf();
    assert_ne!(others, real);
    assert_eq!(http.post_form(&claim, &[("csrf", &others)]).await.status, 403, "another session's token");
    assert_eq!(fed.nodes[0].snapshot().await.unwrap()[0].view.status, "queued", "not claimed");
    // The header form of the token works for scripts; the right token claims.
    let a = http
        .send("POST", &claim, &[("x-csrf-token", &real)], Some(("application/x-www-form-urlencoded", vec![])))
        .await;
    assert_eq!((a.status, a.location()), (303, format!("/case/{id}").as_str()));
    assert_eq!(fed.nodes[0].snapshot().await.unwrap()[0].view.status, "claimed");
    // Release gives it back to the queue; claim and release are both audited.
    let a = http.post_form(&format!("/case/{id}/release"), &[("csrf", &real)]).await;
    assert_eq!(a.status, 303);
    assert_eq!(fed.nodes[0].snapshot().await.unwrap()[0].view.status, "queued");
    let mut admin = Http::new(fed.web(0));
    admin.login("admin", PASSWORD).await;
    let audit = admin.get("/admin").await.body;
    assert!(audit.contains("case.claimed") && audit.contains("case.released"), "claim and release audited");
    // Login and logout forms are protected too.
    let mut anon = Http::new(fed.web(0));
    anon.get("/login").await;
    let a = anon.post_form("/login", &[("name", "dr.wang"), ("password", PASSWORD)]).await;
    assert_eq!(a.status, 403, "login without the form's token");
    assert_eq!(http.post_form("/logout", &[]).await.status, 403);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clinician_cannot_claim_or_report_and_an_admin_cannot_claim() {
    let fed = federation(&[(PROVINCIAL, Tier::Provincial)]).await;
    let id = fed.nodes[0].submit(ecg_request(Urgency::Stat, "chest pain")).await.unwrap().unwrap();
    wait_for_status(&fed.nodes[0], "queued", 1).await;
    for user in ["nurse.chen", "admin"] {
        let mut http = Http::new(fed.web(0));
        assert_eq!(http.login(user, PASSWORD).await.status, 303);
        let csrf = http.get(&format!("/case/{id}")).await.csrf();
        for (action, extra) in [("claim", ("x", "")), ("sign", ("conclusion", "normal")), ("escalate", ("reason", "r"))]
        {
            let a = http.post_form(&format!("/case/{id}/{action}"), &[("csrf", &csrf), extra]).await;
            assert_eq!(a.status, 403, "{user} {action}");
        }
    }
    let mut http = Http::new(fed.web(0));
    http.login("nurse.chen", PASSWORD).await;
    assert_eq!(http.get("/queue").await.status, 403, "the queue is for experts");
    assert_eq!(http.get("/admin").await.status, 403, "the admin page is for admins");
    assert_eq!(fed.nodes[0].snapshot().await.unwrap()[0].view.status, "queued", "still unclaimed");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_in_a_clinical_question_is_shown_as_text() {
    let fed = federation(&[(PROVINCIAL, Tier::Provincial)]).await;
    let evil = r#"<script>alert("xss")</script><img src=x onerror=alert(1)> & "quoted""#;
    let id = fed.nodes[0].submit(ecg_request(Urgency::Urgent, evil)).await.unwrap().unwrap();
    wait_for_status(&fed.nodes[0], "queued", 1).await;
    let mut http = Http::new(fed.web(0));
    http.login("dr.wang", PASSWORD).await;
    let escaped = "&lt;script&gt;alert(&quot;xss&quot;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt; &amp; &quot;quoted&quot;";
    for page in ["/queue".to_owned(), format!("/case/{id}")] {
        let a = http.get(&page).await;
        assert_eq!(a.status, 200);
        assert!(a.body.contains(escaped), "{page} shows the question escaped");
        assert!(!a.body.contains("<script>alert"), "{page} never carries the script as markup");
        assert!(!a.body.contains("<img src=x"), "{page}");
    }
    let mut clinician = Http::new(fed.web(0));
    clinician.login("nurse.chen", PASSWORD).await;
    let a = clinician.get("/clinic").await;
    assert!(a.body.contains(escaped) && !a.body.contains("<script>alert"));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_lock_the_name_out_and_are_audited() {
    let fed = federation(&[(PROVINCIAL, Tier::Provincial)]).await;
    let mut http = Http::new(fed.web(0));
    for _ in 0..auth::LOGIN_FAILURES_MAX {
        assert_eq!(http.login("dr.wang", "wrong password").await.status, 401);
    }
    let a = http.login("dr.wang", PASSWORD).await;
    assert_eq!(a.status, 429, "locked out even with the right password");
    let mut admin = Http::new(fed.web(0));
    assert_eq!(admin.login("admin", PASSWORD).await.status, 303, "another name from the same address still works");
    let page = admin.get("/admin").await;
    assert!(page.body.contains("web.login_failed") && page.body.contains("web.login"), "audited");
    assert!(page.body.contains(PROVINCIAL) && page.body.contains("days left"), "identity and certificate expiry");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expert_claims_signs_a_structured_report_and_the_clinic_reads_it() {
    // Over plain HTTP through a real three-node chain; the browser test does the same
    // by hand in Chromium.
    let fed = federation(&[(PROVINCIAL, Tier::Provincial), (COUNTY, Tier::County), (VILLAGE, Tier::Village)]).await;
    let routine = fed.nodes[2].submit(ecg_request(Urgency::Routine, "routine check")).await.unwrap().unwrap();
    let stat = fed.nodes[2].submit(ecg_request(Urgency::Stat, "crushing chest pain")).await.unwrap().unwrap();
    wait_for_status(&fed.nodes[0], "queued", 2).await;
    let mut expert = Http::new(fed.web(0));
    expert.login("dr.wang", PASSWORD).await;
    let queue = expert.get("/queue").await;
    let (s, r) = (queue.body.find(&stat.to_string()).unwrap(), queue.body.find(&routine.to_string()).unwrap());
    assert!(s < r, "STAT first, though submitted after the routine case");
    let csrf = queue.csrf();
    assert_eq!(expert.post_form(&format!("/case/{stat}/claim"), &[("csrf", &csrf)]).await.status, 303);
    let page = expert.get(&format!("/case/{stat}")).await;
    assert!(page.body.contains(r#"id="report""#), "the report editor is open for the claimant");
    assert!(page.body.contains(VILLAGE) && page.body.contains(COUNTY), "the trail names the hops");
    let a = expert
        .post_form(
            &format!("/case/{stat}/sign"),
            &[
                ("csrf", &csrf),
                ("conclusion", "Inferior STEMI"),
                ("findings", "ST elevation II, III, aVF\nreciprocal depression aVL"),
                ("recommendation", "Transfer for PCI"),
                ("follow_up", "stat"),
                ("text", "Call the cath lab now."),
            ],
        )
        .await;
    assert_eq!(a.status, 303, "{}", a.body);
    let mut clinic = Http::new(fed.web(2));
    clinic.login("nurse.chen", PASSWORD).await;
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let page = clinic.get("/clinic").await;
        if page.body.contains("Call the cath lab now.") {
            for typed in ["Inferior STEMI", "reciprocal depression aVL", "Transfer for PCI", "expert dr.wang"] {
                assert!(page.body.contains(typed), "{typed} on the clinic page");
            }
            break;
        }
        assert!(Instant::now() < end, "the report never reached the clinic page");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fed.stop().await;
}

/// A multipart body: the given text fields, then files (name, bytes), in order.
fn multipart(fields: &[(&str, &str)], files: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "telemedboundary7d1f";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend(format!("--{boundary}\r\ncontent-disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").as_bytes());
    }
    for (name, bytes) in files {
        body.extend(
            format!(
                "--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
                 content-type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clinic_upload_submits_a_case_and_refuses_forged_or_oversize_uploads() {
    let mut web = web_config();
    web.upload_bytes_max = 1024 * 1024;
    let fed = federation_with_experts_at(&[(PROVINCIAL, Tier::Provincial)], 0, web).await;
    let ecg = std::fs::read(node::demo::testdata_dir().join("waveform_ecg.dcm")).unwrap();
    let mut http = Http::new(fed.web(0));
    http.login("nurse.chen", PASSWORD).await;
    let csrf = http.get("/clinic").await.csrf();
    let fields = [("modality", "ecg"), ("urgency", "urgent"), ("patient", "p-77"), ("question", "syncope, QT?")];

    // Without the token first, nothing is stored and no case is made.
    // The server refuses as soon as it has read the first field, so it may close the
    // connection before the client has sent the whole file: a closed connection is a
    // refusal too (what was stored is checked below).
    let (ct, body) = multipart(&fields, &[("ecg.dcm", &ecg)]);
    if let Some(a) = http.try_send("POST", "/clinic/submit", &[], Some((&ct, body))).await {
        assert_eq!(a.status, 403, "no CSRF token");
    }
    let (ct, body) = multipart(&[&[("csrf", "f".repeat(64).as_str())][..], &fields].concat(), &[("ecg.dcm", &ecg)]);
    if let Some(a) = http.try_send("POST", "/clinic/submit", &[], Some((&ct, body))).await {
        assert_eq!(a.status, 403, "a forged CSRF token");
    }
    // An expert may not submit here.
    let mut expert = Http::new(fed.web(0));
    expert.login("dr.wang", PASSWORD).await;
    let expert_csrf = expert.get("/queue").await.csrf();
    let (ct, body) = multipart(&[&[("csrf", expert_csrf.as_str())][..], &fields].concat(), &[("ecg.dcm", &ecg)]);
    if let Some(a) = expert.try_send("POST", "/clinic/submit", &[], Some((&ct, body))).await {
        assert_eq!(a.status, 403, "an expert may not submit");
    }
    // Over the configured limit.
    let big = vec![7u8; 1024 * 1024 + 1];
    let (ct, body) = multipart(&[&[("csrf", csrf.as_str())][..], &fields].concat(), &[("big.bin", &big)]);
    if let Some(a) = http.try_send("POST", "/clinic/submit", &[], Some((&ct, body))).await {
        assert_eq!(a.status, 413, "over the limit");
    } // else the server closed the connection mid-upload: refused too (checked below)
    assert!(fed.nodes[0].snapshot().await.unwrap().is_empty(), "no case from a refused upload");
    let uploads = fed._dir.path().join(PROVINCIAL).join("data/uploads");
    let left = std::fs::read_dir(&uploads).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "refused uploads leave no files behind");

    // A good one becomes a case holding exactly the uploaded bytes.
    let (ct, body) = multipart(&[&[("csrf", csrf.as_str())][..], &fields].concat(), &[("ecg.dcm", &ecg)]);
    let a = http.send("POST", "/clinic/submit", &[], Some((&ct, body))).await;
    assert_eq!(a.status, 303, "{}", a.body);
    let snap = fed.nodes[0].snapshot().await.unwrap();
    assert_eq!(snap.len(), 1);
    let case = &snap[0];
    assert_eq!(a.location(), format!("/case/{}", case.view.case_id));
    assert_eq!((case.view.question.as_str(), case.view.urgency.as_str()), ("syncope, QT?", "urgent"));
    // The case travels under a pseudonym; the clinic (the origin) keeps the patient ID.
    let identity = case.view.identity.as_ref().expect("the origin holds the patient's identity");
    assert_eq!(identity.patient_id, "p-77");
    assert_eq!(case.view.patient, identity.pseudonym);
    assert_ne!(case.view.patient, "p-77", "the patient ID never travels as the case's patient");
    // The upload is stored de-identified (ADR 0005): a DICOM file that keeps the
    // waveform samples (most of its bytes) but not what the Basic Profile removes
    // (its 77-item Waveform Annotation Sequence, X/D in Table E.1-1).
    let size = case.view.attachments[0].1;
    assert!(size > ecg.len() as u64 / 2 && size < ecg.len() as u64 + 4096, "{size} of {}", ecg.len());
    assert_eq!(case.view.attachments[0].2, "application/dicom");
    let page = http.get("/clinic").await;
    assert!(page.body.contains("syncope, QT?"));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expert_escalates_with_a_reason_that_the_trail_keeps() {
    let national = "nhc.cn";
    let fed =
        federation_with_experts_at(&[(national, Tier::National), (PROVINCIAL, Tier::Provincial)], 1, web_config())
            .await;
    let id = fed.nodes[1].submit(ecg_request(Urgency::Urgent, "broad complex tachycardia")).await.unwrap().unwrap();
    wait_for_status(&fed.nodes[1], "queued", 1).await;
    let mut http = Http::new(fed.web(1));
    http.login("dr.wang", PASSWORD).await;
    let csrf = http.get(&format!("/case/{id}")).await.csrf();
    let a = http.post_form(&format!("/case/{id}/escalate"), &[("csrf", &csrf), ("reason", "")]).await;
    assert_eq!(a.status, 422, "a reason is required");
    let a = http
        .post_form(&format!("/case/{id}/escalate"), &[("csrf", &csrf), ("reason", "needs an electrophysiologist")])
        .await;
    assert_eq!(a.status, 303, "{}", a.body);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let at_national = fed.nodes[0].snapshot().await.unwrap();
        if let Some(c) = at_national.iter().find(|c| c.view.case_id == id.to_string()) {
            let reason = &c.view.trail.last().expect("a hop").reason;
            assert_eq!(reason, "dr.wang escalated it: needs an electrophysiologist");
            break;
        }
        assert!(Instant::now() < end, "the case never reached the national node");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The national node shows the case from the offer on; here the hop joins the
    // trail once the national node's custody receipt has come back.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let page = http.get(&format!("/case/{id}")).await;
        if page.body.contains("dr.wang escalated it: needs an electrophysiologist") {
            break;
        }
        assert!(Instant::now() < end, "the case page never showed why it moved on");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_tell_a_logged_in_page_that_the_queue_changed() {
    let fed = federation(&[(PROVINCIAL, Tier::Provincial)]).await;
    let mut http = Http::new(fed.web(0));
    http.login("dr.wang", PASSWORD).await;
    let cookie = format!("{}_{}={}", auth::COOKIE, fed.web(0).port(), http.cookie.clone().unwrap());
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = hyper::Request::get(format!("http://{}/events", fed.web(0)))
        .header("cookie", cookie)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let id = fed.nodes[0].submit(ecg_request(Urgency::Stat, "palpitations")).await.unwrap().unwrap();
    let mut body = res.into_body();
    let mut seen = String::new();
    let end = Instant::now() + Duration::from_secs(20);
    while !seen.contains(&format!("case.queued {id}")) {
        assert!(Instant::now() < end, "no queue event within 20 s; got {seen:?}");
        if let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_secs(5), body.frame()).await
            && let Ok(data) = frame.into_data()
        {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(seen.contains("event: case"), "{seen}");
    fed.stop().await;
}

fn png_size(bytes: &[u8]) -> (u32, u32, png::ColorType) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().expect("a valid PNG");
    let info = reader.info();
    (info.width, info.height, info.color_type)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicom_images_render_at_a_chosen_window_and_slides_serve_tiles() {
    let fed = federation(&[(PROVINCIAL, Tier::Provincial)]).await;
    let data = node::demo::testdata_dir();
    let mut req = ecg_request(Urgency::Urgent, "head injury: bleed?");
    (req.modality, req.files) = (Modality::Imaging, vec![data.join("CT_small.dcm")]);
    let ct = fed.nodes[0].submit(req).await.unwrap().unwrap();
    let mut req = ecg_request(Urgency::Routine, "margins clear?");
    (req.modality, req.files) = (Modality::Pathology, vec![data.join("cmu_small_region.svs")]);
    let slide = fed.nodes[0].submit(req).await.unwrap().unwrap();
    let mut http = Http::new(fed.web(0));
    http.login("dr.wang", PASSWORD).await;

    let page = http.get(&format!("/case/{ct}")).await;
    assert!(page.body.contains("image-viewer") && page.body.contains(&format!("/case/{ct}/attachment/0/image.png")));
    let default = http.get(&format!("/case/{ct}/attachment/0/image.png")).await;
    assert_eq!(default.status, 200, "{}", default.body);
    assert_eq!(default.headers["content-type"], "image/png");
    let image = node::readers::read_dicom_image_file(data.join("CT_small.dcm")).unwrap();
    let (w, h, color) = png_size(&default.bytes);
    assert_eq!((w, h, color), (image.columns, image.rows, png::ColorType::Grayscale));
    let bone = http.get(&format!("/case/{ct}/attachment/0/image.png?wc=500&ww=2000")).await;
    assert_eq!(bone.status, 200);
    assert_ne!(bone.bytes, default.bytes, "another window gives another rendering");
    assert_eq!(http.get(&format!("/case/{ct}/attachment/0/image.png?wc=x&ww=1")).await.status, 400);
    assert_eq!(http.get(&format!("/case/{ct}/attachment/0/image.png?wc=1&ww=0")).await.status, 400);
    assert_eq!(http.get(&format!("/case/{ct}/attachment/1/image.png")).await.status, 404, "no attachment 1");

    let page = http.get(&format!("/case/{slide}")).await;
    assert!(page.body.contains("slide-viewer") && page.body.contains("data-levels"), "slide viewer on the page");
    let levels = node::readers::slide::Slide::open(data.join("cmu_small_region.svs")).unwrap().levels().to_vec();
    let tile = http.get(&format!("/case/{slide}/attachment/0/tile/0/0/0")).await;
    assert_eq!(tile.status, 200, "{}", tile.body);
    let (w, h, color) = png_size(&tile.bytes);
    assert_eq!(
        (w, h, color),
        (levels[0].tile_width.min(levels[0].width), levels[0].tile_height.min(levels[0].height), png::ColorType::Rgb)
    );
    let last = levels.len() - 1;
    assert_eq!(http.get(&format!("/case/{slide}/attachment/0/tile/{last}/0/0")).await.status, 200, "coarsest level");
    assert_eq!(http.get(&format!("/case/{slide}/attachment/0/tile/{}/0/0", levels.len())).await.status, 404);
    assert_eq!(http.get(&format!("/case/{slide}/attachment/0/tile/0/9999/0")).await.status, 404);
    assert_eq!(http.get(&format!("/case/{ct}/attachment/0/tile/0/0/0")).await.status, 404, "a CT is not a slide");
    let mut anon = Http::new(fed.web(0));
    assert_eq!(anon.get(&format!("/case/{slide}/attachment/0/tile/0/0/0")).await.status, 401);
    assert_eq!(anon.get(&format!("/case/{ct}/attachment/0/image.png")).await.status, 401);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_add_command_creates_an_account_that_can_log_in() {
    let dir = tempfile::tempdir().unwrap();
    let plan = vec![PlannedNode { name: PROVINCIAL.into(), tier: Tier::Provincial, parent: None, experts: vec![] }];
    let mut config = provision(dir.path(), &plan).unwrap().remove(0);
    config.web = Some(web_config());
    let toml_path = dir.path().join("node.toml");
    std::fs::write(&toml_path, toml::to_string(&config).unwrap()).unwrap();
    let add = |name: &str, role: &str, password: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_telemed-node"))
            .args(["user", "add", "--config", toml_path.to_str().unwrap(), "--name", name, "--role", role])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = add("dr.zhao", "expert", PASSWORD);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = add("dr.zhao", "surgeon", PASSWORD);
    assert!(!out.status.success(), "an unknown role is refused");
    let out = add("x", "admin", "short");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("password"),
        "a short password is refused"
    );
    let running = node::daemon::start(config).await.unwrap();
    let mut http = Http::new(running.web_addr.unwrap());
    assert_eq!(http.login("dr.zhao", PASSWORD).await.location(), "/");
    assert_eq!(http.get("/").await.location(), "/queue", "an expert lands on the queue");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_event_streams_are_bounded_and_their_places_come_back() {
    let fed = federation(&[(PROVINCIAL, Tier::Provincial)]).await;
    let mut http = Http::new(fed.web(0));
    http.login("dr.wang", PASSWORD).await;
    let cookie = format!("{}_{}={}", auth::COOKIE, fed.web(0).port(), http.cookie.clone().unwrap());
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let open = || {
        let req = hyper::Request::get(format!("http://{}/events", fed.web(0)))
            .header("cookie", cookie.clone())
            .body(Full::new(Bytes::new()))
            .unwrap();
        client.request(req)
    };
    let mut streams = Vec::new();
    for _ in 0..node::web::EVENT_STREAMS_MAX {
        let res = open().await.unwrap();
        assert_eq!(res.status(), 200);
        streams.push(res);
    }
    assert_eq!(open().await.unwrap().status(), 503, "one stream too many");
    drop(streams.pop());
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let status = open().await.unwrap().status();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < end, "a closed stream's place never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(streams);
    fed.stop().await;
}
