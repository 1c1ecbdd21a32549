//! The web UI in a real headless Chromium, driven over WebDriver (chromedriver from
//! Debian's `chromium-driver`, installed by `scripts/deps/chromium.sh`). A three-node
//! federation on loopback: an expert at the provincial hub works the consult queue,
//! reads the 12-lead ECG, signs a report, and the village clinic's page shows it.
//! Screenshots go to `target/test-artifacts/ui/`. Without Chromium this test FAILS.

use super::web::{COUNTY, PASSWORD, PROVINCIAL, VILLAGE, ecg_request, federation, wait_for_status};
use fantoccini::{Client, ClientBuilder, Locator};
use federation_proto::{Tier, Urgency};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// chromedriver, killed when the test ends however it ends.
struct Driver(Child);
impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/lib/chromium")])
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find(|p| p.is_file())
}

async fn start_browser() -> (Driver, Client) {
    let Some(driver) = find_program(&["chromedriver"]) else {
        panic!(
            "chromedriver not found: the browser tests need Debian's `chromium` and `chromium-driver` \
             packages; install them with `bash scripts/deps/chromium.sh` (scripts/test.sh does)"
        );
    };
    let chromium = find_program(&["chromium", "chromium-browser", "google-chrome"])
        .unwrap_or_else(|| panic!("chromium not found: install it with `bash scripts/deps/chromium.sh`"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(&driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
    let guard = Driver(child);
    let end = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < end, "chromedriver did not listen on port {port} within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1100", "--no-first-run", "--disable-extensions"],
        }),
    );
    let client = tokio::time::timeout(
        Duration::from_secs(60),
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}")),
    )
    .await
    .expect("a Chromium session within 60 s")
    .unwrap_or_else(|e| panic!("chromedriver would not start Chromium ({}): {e}", chromium.display()));
    (guard, client)
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts/ui");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(artifacts().join(name), png).unwrap();
}

async fn login(c: &Client, base: &str, user: &str) {
    c.goto(&format!("{base}/login")).await.unwrap();
    if let Ok(button) = c.find(Locator::Css("form.logout button")).await {
        // Someone is logged in here already: log out first (through the form, with its token).
        button.click().await.unwrap();
        c.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css("#name")).await.expect("logged out");
    }
    c.find(Locator::Css("#name")).await.unwrap().send_keys(user).await.unwrap();
    c.find(Locator::Css("#password")).await.unwrap().send_keys(PASSWORD).await.unwrap();
    c.find(Locator::Css("#login")).await.unwrap().click().await.unwrap();
    c.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css("form.logout")).await.expect("logged in");
}

async fn js(c: &Client, script: &str) -> serde_json::Value {
    c.execute(script, vec![]).await.unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expert_reads_a_stat_ecg_in_chromium_and_the_village_sees_the_signed_report() {
    let (_driver, c) = start_browser().await;
    let fed = federation(&[(PROVINCIAL, Tier::Provincial), (COUNTY, Tier::County), (VILLAGE, Tier::Village)]).await;
    let village = &fed.nodes[2];
    // The routine case first, so that STAT-first is the queue's order, not arrival's.
    village.submit(ecg_request(Urgency::Routine, "routine pre-operative ECG")).await.unwrap().unwrap();
    let evil = r#"chest pain <script>document.title='pwned'</script><img src=x onerror="document.title='pwned'">"#;
    let stat = village.submit(ecg_request(Urgency::Stat, evil)).await.unwrap().unwrap();
    wait_for_status(&fed.nodes[0], "queued", 2).await;

    let hub = format!("http://{}", fed.web(0));
    login(&c, &hub, "dr.wang").await;
    c.goto(&format!("{hub}/queue")).await.unwrap();
    c.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css("tr.case-row")).await.unwrap();
    screenshot(&c, "1-queue.png").await;
    let order =
        js(&c, "return [...document.querySelectorAll('tr.case-row')].map(r => [r.dataset.caseId, r.dataset.urgency])")
            .await;
    assert_eq!(order[0][0], stat.to_string(), "the STAT ECG is at the top: {order}");
    assert_eq!(order[0][1], "stat");
    assert_eq!(order[1][1], "routine");
    let countdown = c.find(Locator::Css("tr.case-row .countdown")).await.unwrap().text().await.unwrap();
    assert!(countdown.ends_with("left") && countdown.contains(':'), "the countdown ticks in the browser: {countdown}");

    // Open it: the question is text, the 12-lead ECG is drawn on its grid.
    c.find(Locator::Css("tr.case-row td.question a")).await.unwrap().click().await.unwrap();
    c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css("#ecg svg")).await.expect("the ECG renders");
    let question = c.find(Locator::Css("#question")).await.unwrap().text().await.unwrap();
    assert!(question.contains("<script>document.title='pwned'</script>"), "shown as text: {question}");
    let leads = js(&c, "return [...document.querySelectorAll('#ecg text.ecg-lead')].map(t => t.textContent)").await;
    let mut names: Vec<String> = leads.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    names.sort();
    names.dedup();
    let mut want =
        ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"].map(String::from).to_vec();
    want.sort();
    assert_eq!(names, want, "the 12 lead labels");
    let grid = js(
        &c,
        "return [document.querySelectorAll('#ecg pattern#ecg-minor').length, document.querySelectorAll('#ecg pattern#ecg-major').length, \
         document.querySelectorAll('#ecg rect.ecg-grid-major').length, document.querySelectorAll('#ecg polyline.ecg-trace').length, \
         document.querySelectorAll('#ecg path.ecg-cal').length]",
    )
    .await;
    assert_eq!(grid, serde_json::json!([1, 1, 1, 13, 4]), "grid, 12 traces + rhythm strip, calibration pulses");
    let drawn = js(&c, "return document.querySelector('#ecg svg').getBoundingClientRect().width").await;
    assert!(drawn.as_f64().unwrap() > 600.0, "the ECG is laid out wide: {drawn}");
    screenshot(&c, "2-case-ecg.png").await;

    // Claim, write, sign.
    c.find(Locator::Css("#claim")).await.unwrap().click().await.unwrap();
    c.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css("#report")).await.expect("the editor opens");
    c.find(Locator::Css("#conclusion")).await.unwrap().send_keys("Sinus rhythm, no acute ST changes").await.unwrap();
    c.find(Locator::Css("#findings")).await.unwrap().send_keys("Rate 72/min\nPR 160 ms, QRS 90 ms").await.unwrap();
    c.find(Locator::Css("#recommendation")).await.unwrap().send_keys("Troponin at 3 h").await.unwrap();
    c.find(Locator::Css("#follow_up option[value=urgent]")).await.unwrap().click().await.unwrap();
    c.find(Locator::Css("#text")).await.unwrap().send_keys("Typed in Chromium by the reading expert.").await.unwrap();
    screenshot(&c, "3-report-editor.png").await;
    c.find(Locator::Css("#sign")).await.unwrap().click().await.unwrap();
    c.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css("section.report")).await.expect("signed");
    let title = js(&c, "return document.title").await;
    assert!(!title.as_str().unwrap().contains("pwned"), "the question's script never ran: {title}");
    assert!(c.get_alert_text().await.is_err(), "no alert is open");

    // The village clinic's page shows the signed report.
    let clinic = format!("http://{}", fed.web(2));
    login(&c, &clinic, "nurse.chen").await;
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        c.goto(&format!("{clinic}/clinic")).await.unwrap();
        let text = c.find(Locator::Css("main")).await.unwrap().text().await.unwrap();
        if text.contains("Typed in Chromium by the reading expert.") {
            for typed in ["Sinus rhythm, no acute ST changes", "PR 160 ms, QRS 90 ms", "Troponin at 3 h", "urgent"] {
                assert!(text.contains(typed), "`{typed}` on the clinic page");
            }
            break;
        }
        assert!(Instant::now() < end, "the report never reached the village clinic page:\n{text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    screenshot(&c, "4-village-clinic-report.png").await;

    // The provincial hub's admin page: identity, certificate expiry, the child link, audit.
    login(&c, &hub, "admin").await;
    c.goto(&format!("{hub}/admin")).await.unwrap();
    let text = c.find(Locator::Css("main")).await.unwrap().text().await.unwrap();
    assert!(text.contains("days left"), "certificate expiry: {text}");
    assert!(text.contains(COUNTY) && text.contains("child"), "the county's link: {text}");
    assert!(text.contains("case.claimed") && text.contains("dr.wang"), "the claim is audited: {text}");
    assert!(text.contains("web.login"), "logins are audited");
    screenshot(&c, "5-admin.png").await;
    let title = js(&c, "return document.title").await;
    assert!(!title.as_str().unwrap().contains("pwned"));
    c.close().await.unwrap();
    fed.stop().await;
}

/// Polls `script` (returning a boolean) for up to 20 s.
async fn until(c: &Client, what: &str, script: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    while js(c, script).await != serde_json::Value::Bool(true) {
        assert!(Instant::now() < end, "{what} did not happen within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicom_image_windows_and_zooms_and_the_slide_viewer_zooms_and_pans_in_chromium() {
    let (_driver, c) = start_browser().await;
    let fed = federation(&[(PROVINCIAL, Tier::Provincial)]).await;
    let data = node::demo::testdata_dir();
    let mut req = ecg_request(Urgency::Urgent, "head injury: bleed?");
    (req.modality, req.files) = (federation_proto::Modality::Imaging, vec![data.join("CT_small.dcm")]);
    let ct = fed.nodes[0].submit(req).await.unwrap().unwrap();
    let mut req = ecg_request(Urgency::Routine, "skin biopsy: margins clear?");
    (req.modality, req.files) = (federation_proto::Modality::Pathology, vec![data.join("cmu_small_region.svs")]);
    let slide = fed.nodes[0].submit(req).await.unwrap().unwrap();
    let hub = format!("http://{}", fed.web(0));
    login(&c, &hub, "dr.wang").await;

    c.goto(&format!("{hub}/case/{ct}")).await.unwrap();
    let loaded = "const i = document.querySelector('.image-viewer img'); return i.complete && i.naturalWidth > 0";
    until(&c, "the CT image loads", loaded).await;
    js(&c, "document.querySelector('.image-viewer .stage').dispatchEvent(new WheelEvent('wheel', {deltaY: -100, bubbles: true, cancelable: true})); return true").await;
    let transform = js(&c, "return document.querySelector('.image-viewer img').style.transform").await;
    assert!(transform.as_str().unwrap().contains("scale(1.2)"), "zoomed in: {transform}");
    c.find(Locator::Css(".image-viewer input[name=wc]")).await.unwrap().send_keys("40").await.unwrap();
    c.find(Locator::Css(".image-viewer input[name=ww]")).await.unwrap().send_keys("80").await.unwrap();
    c.find(Locator::Css(".image-viewer form.wl button")).await.unwrap().click().await.unwrap();
    until(&c, "the re-windowed image loads", "const i = document.querySelector('.image-viewer img'); return i.src.includes('wc=40&ww=80') && i.complete && i.naturalWidth > 0").await;
    js(&c, "document.querySelector('.image-viewer').scrollIntoView(); return true").await;
    screenshot(&c, "6-ct-window-zoom.png").await;

    c.goto(&format!("{hub}/case/{slide}")).await.unwrap();
    let tiles_loaded = "const t = [...document.querySelectorAll('.slide-viewer .tiles img')]; return t.length > 0 && t.every(i => i.complete && i.naturalWidth > 0)";
    until(&c, "the slide's tiles load", tiles_loaded).await;
    // The sample slide (a small region) has a single tiled level: zooming in past it
    // magnifies, and dragging pans (other tiles come into view).
    let levels = js(&c, "return JSON.parse(document.querySelector('.slide-viewer').dataset.levels).length").await;
    assert_eq!(levels, 1, "the sample slide's pyramid (update this test for a multi-level sample)");
    let src = js(&c, "return document.querySelector('.slide-viewer .tiles img').src").await;
    assert!(src.as_str().unwrap().contains("/tile/0/0/0"), "the first tile at the top left: {src}");
    js(&c, "document.querySelector('.slide-viewer').dispatchEvent(new WheelEvent('wheel', {deltaY: -100, bubbles: true, cancelable: true})); return true").await;
    let transform = js(&c, "return document.querySelector('.slide-viewer .tiles').style.transform").await;
    assert_eq!(transform, "scale(1.25)", "zoomed in");
    let before =
        js(&c, "return [...document.querySelectorAll('.slide-viewer .tiles img')].map(i => i.src).join()").await;
    js(
        &c,
        "const v = document.querySelector('.slide-viewer'); const r = v.getBoundingClientRect(); \
         v.dispatchEvent(new MouseEvent('mousedown', {clientX: r.left + 400, clientY: r.top + 400, bubbles: true})); \
         window.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left - 200, clientY: r.top - 200, bubbles: true})); \
         window.dispatchEvent(new MouseEvent('mouseup', {bubbles: true})); return true",
    )
    .await;
    until(&c, "tiles after the pan load", tiles_loaded).await;
    let after =
        js(&c, "return [...document.querySelectorAll('.slide-viewer .tiles img')].map(i => i.src).join()").await;
    assert_ne!(before, after, "panning brings other tiles into view");
    js(&c, "document.querySelector('.slide-viewer').scrollIntoView(); return true").await;
    screenshot(&c, "7-slide-tiles.png").await;
    c.close().await.unwrap();
    fed.stop().await;
}
