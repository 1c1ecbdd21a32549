//! Local AI triage on real files and real nodes: the shipped models read the real
//! recordings of DESIGN.md §8, and a village node's model resolves a case or sends
//! it up with its finding, which the expert above sees.

use federation_proto::{Modality, Tier, Urgency};
use node::config::ModelConfig;
use node::daemon::SubmitRequest;
use node::demo::{PlannedNode, provision, testdata_dir};
use node::models::ecg::EcgModel;
use node::models::synth::Rhythm;
use std::time::{Duration, Instant};

fn testdata(name: &str) -> std::path::PathBuf {
    testdata_dir().join(name)
}

#[test]
fn waveform_ecg_dcm_is_read_as_normal_sinus_rhythm() {
    let ecg = node::readers::read_dicom_ecg_file(testdata("waveform_ecg.dcm")).unwrap();
    assert_eq!(ecg.leads.len(), 12);
    let read = EcgModel::shipped().unwrap().read(&ecg).unwrap();
    let (top, p) = read.top();
    assert_eq!(top, Rhythm::NormalSinus, "{read:?}");
    assert!(p > 0.5, "{read:?}");
}

#[test]
fn mit_bih_record_208_shows_ectopic_beats() {
    let ecg = node::readers::read_scipy_ecg_file(testdata("scipy_ecg.dat")).unwrap();
    let read = EcgModel::shipped().unwrap().read(&ecg).unwrap();
    assert_eq!(read.windows.len(), 30, "5 min in 10 s windows");
    let pvc_windows = read.windows_per_class[Rhythm::Ectopic as usize];
    // Record 208 has PVCs throughout (992 of its 2955 beats in the whole record).
    assert!(pvc_windows >= 15, "PVC found in only {pvc_windows} of 30 windows: {:?}", read.windows_per_class);
    assert_eq!(read.top().0, Rhythm::Ectopic, "{:?}", read.probs);
    assert_eq!(read.windows_per_class[Rhythm::AtrialFibrillation as usize], 0);
    // The second half never trained the model (node::models::real): judge it alone.
    let held_out: Vec<_> = read.windows.iter().filter(|w| w.start_s >= node::models::real::ECG_TRAIN_SECONDS).collect();
    assert_eq!(held_out.len(), 15);
    let pvc = held_out.iter().filter(|w| node::models::mlp::argmax(&w.probs).0 == Rhythm::Ectopic as usize).count();
    assert!(pvc >= 12, "PVC found in only {pvc} of the 15 held-out windows");
}

#[test]
fn the_same_record_reads_the_same_at_any_common_sampling_rate() {
    let ecg = node::readers::read_dicom_ecg_file(testdata("waveform_ecg.dcm")).unwrap();
    let model = EcgModel::shipped().unwrap();
    for hz in [250.0, 360.0, 500.0] {
        let read = model.read(&ecg.resample(hz)).unwrap();
        assert_eq!(read.top().0, Rhythm::NormalSinus, "at {hz} Hz: {read:?}");
    }
}

/// Starts a township (simulated ECG expert) and a village with the ECG model whose
/// STAT threshold is out of reach and whose urgent threshold is low.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confident_model_resolves_here_and_unsure_one_sends_the_case_up_with_its_finding() {
    let dir = tempfile::tempdir().unwrap();
    let township = "gaocheng.dengfeng.zhengzhou.henan.cn";
    let plan = vec![
        PlannedNode { name: township.into(), tier: Tier::Township, parent: None, experts: vec![(Modality::Ecg, 1)] },
        PlannedNode {
            name: format!("v1.{township}"),
            tier: Tier::Village,
            parent: Some(township.into()),
            experts: vec![],
        },
    ];
    let mut configs = provision(dir.path(), &plan).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let parent_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    configs[0].listen = parent_addr;
    configs[1].parents =
        vec![node::config::ParentConfig { name: township.into(), tier: Tier::Township, addr: parent_addr }];
    configs[1].models = vec![ModelConfig { kind: "ecg".into(), thresholds: Some([0.999, 0.5, 0.5]), weights: None }];
    let parent = node::daemon::start(configs[0].clone()).await.unwrap();
    let village = node::daemon::start(configs[1].clone()).await.unwrap();
    let submit = |urgency| SubmitRequest {
        study: None,
        files: vec![testdata("waveform_ecg.dcm")],
        modality: Modality::Ecg,
        urgency,
        question: "palpitations".into(),
        patient: "p-11".into(),
        task: None,
        details: Default::default(),
    };
    let confident = village.submit(submit(Urgency::Urgent)).await.unwrap().unwrap();
    let unsure = village.submit(submit(Urgency::Stat)).await.unwrap().unwrap();

    let end = Instant::now() + Duration::from_secs(60);
    let (mut here, mut above) = (None, None);
    while here.is_none() || above.is_none() {
        assert!(Instant::now() < end, "no reports in time: {:?}", village.status().await.unwrap().cases);
        here = village.show(confident).await.unwrap().and_then(|v| v.report);
        above = village.show(unsure).await.unwrap().and_then(|v| v.report);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (here, above) = (here.unwrap(), above.unwrap());
    assert!(here.machine_made, "{here:?}");
    assert!(here.node.ends_with(township) && here.node.starts_with("v1."), "read at the village: {here:?}");
    assert!(here.reader.starts_with("model ecg ecg-mlp-1+"), "{here:?}");
    assert_eq!(here.labels[0].0, "normal_sinus_rhythm");
    assert!(!above.machine_made, "{above:?}");
    assert_eq!(above.node, township, "read by the expert above");

    // The expert above saw the village model's finding with the case.
    let at_parent = parent.show(unsure).await.unwrap().expect("the case is held above");
    assert_eq!(at_parent.findings.len(), 1, "{at_parent:?}");
    let finding = &at_parent.findings[0];
    assert!(finding.reader.starts_with("model ecg"), "{finding:?}");
    assert_eq!(finding.labels[0].0, "normal_sinus_rhythm");
    assert!(finding.labels[0].1 < 0.999);
    assert!(at_parent.render().contains("finding at v1."), "{}", at_parent.render());
    assert!(parent.show(confident).await.unwrap().is_none(), "the resolved case never left the village");
    village.shutdown().await.unwrap();
    parent.shutdown().await.unwrap();
}

#[test]
fn pydicom_data_chest_radiograph_is_recognised_as_a_chest_xray() {
    use node::models::{ModelKind, local::LocalModel};
    let model = LocalModel::shipped(ModelKind::Imaging).unwrap();
    let chest = node::models::inputs::load(&testdata("RG1_J2KI.dcm")).unwrap();
    let read = model.read_input(&chest).unwrap();
    assert_eq!(read.labels[0].label, "chest_xray", "{read:?}");
    assert!(read.labels[0].confidence > 0.9, "{read:?}");
    // The same set's radiograph of a tibia is not called a chest X-ray.
    let tibia = node::models::inputs::load(&testdata("RG3_J2KI.dcm")).unwrap();
    let read = model.read_input(&tibia).unwrap();
    assert!(read.labels[0].label != "chest_xray" || read.labels[0].confidence <= 0.5, "{read:?}");
    // Pixels and header agree it is "other": said so, not reported as a contradiction.
    assert!(read.summary.starts_with("not an image this model reads (other"), "{}", read.summary);
    assert!(read.labels.iter().all(|l| !l.label.starts_with("dicom_header_says")), "{read:?}");
}

#[test]
fn cmu_slide_tissue_tiles_are_told_apart_from_background() {
    use node::models::pathology::{PathologyModel, tissue_share_by_rule};
    let mut slide = node::readers::Slide::open(testdata("cmu_small_region.svs")).unwrap();
    let tiles = node::models::inputs::slide_tiles(&mut slide).unwrap();
    let model = PathologyModel::shipped().unwrap();
    let reads = model.read(&tiles.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>()).unwrap();
    // Reference labels by the documented rule; tiles in between are left out.
    let (mut agree, mut tissue, mut background) = (0, 0, 0);
    let (mut held_out, mut held_out_agree) = (0, 0);
    let columns = tiles.iter().map(|((x, _), _)| x + 1).max().unwrap();
    for (((x, _), t), r) in tiles.iter().zip(&reads) {
        let share = tissue_share_by_rule(t);
        let truth = if share >= 0.5 {
            tissue += 1;
            true
        } else if share <= 0.05 {
            background += 1;
            false
        } else {
            continue;
        };
        if r.is_tissue() == truth {
            agree += 1;
        }
        // The right half of the grid never trained the model (node::models::real).
        if !node::models::real::tile_trains(*x, columns) {
            held_out += 1;
            held_out_agree += (r.is_tissue() == truth) as usize;
        }
    }
    assert!(held_out >= 20, "only {held_out} clear held-out tiles");
    assert!(held_out_agree as f32 >= 0.95 * held_out as f32, "held out: agree on {held_out_agree} of {held_out}");
    let clear = tissue + background;
    eprintln!("tiles {}: tissue {tissue}, background {background}, agree {agree}", tiles.len());
    assert!(tissue >= 10 && background >= 10, "the slide has both: tissue {tissue}, background {background}");
    assert!(agree as f32 >= 0.95 * clear as f32, "agree on {agree} of {clear}");
}
