//! Photo metadata removal (`node::scrub_photo`) on arbitrary bytes, as JPEG and as
//! PNG (the magic is prepended when missing so the walk gets past it). Never
//! panics; a cleaned file is never longer than the input, and cleaning it again
//! changes nothing (nothing it kept is something it would remove).
#![no_main]

use libfuzzer_sys::fuzz_target;
use node::scrub_photo::{PNG_SIGNATURE, scrub_jpeg, scrub_png};

fuzz_target!(|data: &[u8]| {
    let mut jpeg = data.to_vec();
    if !node::scrub_photo::is_jpeg(&jpeg) {
        jpeg.splice(0..0, [0xFF, 0xD8, 0xFF]);
    }
    if let Ok((clean, _)) = scrub_jpeg(&jpeg) {
        assert!(clean.len() <= jpeg.len());
        assert_eq!(scrub_jpeg(&clean).expect("a cleaned JPEG cleans again").0, clean);
    }
    let mut png = data.to_vec();
    if !node::scrub_photo::is_png(&png) {
        png.splice(0..0, PNG_SIGNATURE);
    }
    if let Ok((clean, _)) = scrub_png(&png) {
        assert!(clean.len() <= png.len());
        assert_eq!(scrub_png(&clean).expect("a cleaned PNG cleans again").0, clean);
    }
});
