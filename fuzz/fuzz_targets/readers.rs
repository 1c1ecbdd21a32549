//! Every file reader on arbitrary bytes (node::readers): DICOM waveform and image,
//! SciPy's .npz ECG, WFDB headers and signal files (formats 212, 16, 80), tiled
//! TIFF slides. Never panics; what is read is self-consistent.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use node::readers::{self, Slide, wfdb};

fuzz_target!(|data: &[u8]| {
    if let Ok(ecg) = readers::read_dicom_ecg(data) {
        let n = ecg.samples_per_lead();
        assert!(ecg.leads.iter().all(|l| l.millivolts.len() == n), "leads of one length");
    }
    if let Ok(img) = readers::read_dicom_image(data) {
        let samples = img.rows as usize * img.columns as usize * usize::from(img.samples_per_pixel);
        assert_eq!(img.pixels.len(), samples, "frame size");
        assert_eq!(img.model_input(16, 16).len(), 256);
    }
    if let Ok(ecg) = readers::read_scipy_ecg(data) {
        assert_eq!(ecg.leads.len(), 1);
    }
    // As a header, and as the signal file of fixed headers.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(header) = wfdb::parse_wfdb_header(text) {
            let files: HashMap<String, Vec<u8>> =
                header.signals.iter().map(|s| (s.file_name.clone(), data.to_vec())).collect();
            let _ = wfdb::decode_wfdb(&header, &files);
        }
    }
    for format in [212, 16, 80] {
        let text = format!("r 2 360\nr.dat {format} 200(1024)/mV 12 0 0 0 0 MLII\nr.dat {format} 200 12 0 0 0 0 V1\n");
        let header = wfdb::parse_wfdb_header(&text).expect("fixed header");
        let files = HashMap::from([("r.dat".to_string(), data.to_vec())]);
        if let Ok(ecg) = wfdb::decode_wfdb(&header, &files) {
            assert_eq!(ecg.leads.len(), 2);
            assert_eq!(ecg.leads[0].millivolts.len(), ecg.leads[1].millivolts.len());
        }
    }
    if let Ok(mut slide) = Slide::from_reader(std::io::Cursor::new(data)) {
        let levels = slide.levels().to_vec();
        for (i, l) in levels.iter().enumerate().take(4) {
            for (tx, ty) in [(0, 0), (l.tiles_across - 1, l.tiles_down - 1)] {
                if let Ok(tile) = slide.read_tile(i, tx, ty) {
                    assert_eq!(tile.rgb.len(), tile.width as usize * tile.height as usize * 3);
                    assert!(tile.width <= l.tile_width && tile.height <= l.tile_height);
                }
            }
        }
    }
});
