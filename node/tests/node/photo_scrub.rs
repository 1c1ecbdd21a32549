//! Photos attached to a case lose their metadata and keep their pixels
//! (`scrub_photo.rs`), checked with tools that share no code with the node: real
//! JPEG and PNG files written by Pillow with EXIF (incl. GPS), XMP, IPTC,
//! comments, PNG text/time chunks; exiftool lists what metadata is left; Pillow
//! decodes the pixels before and after (and checks every PNG CRC).
//! Needs `bash scripts/deps/photo-tools.sh` (exiftool, Pillow in target/py-venv).

use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    let venv = std::env::var_os("TELEMED_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py-venv"));
    let py = venv.join("bin/python");
    assert!(py.exists(), "no Python venv at {}: run `bash scripts/deps/photo-tools.sh`", py.display());
    py
}

fn run_py(script: &str, args: &[&Path]) -> String {
    let out = Command::new(python()).arg("-c").arg(script).args(args).output().expect("python runs");
    assert!(
        out.status.success(),
        "python failed (run `bash scripts/deps/photo-tools.sh`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes photo.jpg and photo.png into the directory, full of identifying metadata.
const MAKE: &str = r#"
import sys, struct, zlib
from PIL import Image, ExifTags, PngImagePlugin
d = sys.argv[1]
img = Image.new("RGB", (64, 48))
img.putdata([((x * 4) % 256, (y * 5) % 256, (x * y) % 256) for y in range(48) for x in range(64)])
exif = Image.Exif()
exif[ExifTags.Base.Artist] = "Zhang Wei"
exif[ExifTags.Base.ImageDescription] = "patient Zhang Wei 410102198001011234"
exif[ExifTags.Base.Make] = "PhoneMaker"
exif[ExifTags.Base.DateTime] = "2026:11:28 09:15:00"
gps = {ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (34.0, 27.0, 30.0),
       ExifTags.GPS.GPSLongitudeRef: "E", ExifTags.GPS.GPSLongitude: (113.0, 2.0, 15.0)}
exif[ExifTags.IFD.GPSInfo] = gps
img.save(d + "/base.jpg", quality=90, exif=exif, comment=b"Zhang Wei, bed 4")
raw = open(d + "/base.jpg", "rb").read()
def seg(marker, body):
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body
xmp = seg(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'><rdf:Description xmlns:dc='http://purl.org/dc/elements/1.1/' dc:creator='Zhang Wei'/></rdf:RDF></x:xmpmeta>")
iptc_record = b"\x1c\x02\x50" + struct.pack(">H", 9) + b"Zhang Wei"
bim = b"8BIM\x04\x04\0\0" + struct.pack(">I", len(iptc_record)) + iptc_record
iptc = seg(0xED, b"Photoshop 3.0\0" + bim)
open(d + "/photo.jpg", "wb").write(raw[:2] + xmp + iptc + raw[2:])
info = PngImagePlugin.PngInfo()
info.add_text("Author", "Zhang Wei")
info.add_text("Comment", "ID 410102198001011234", zip=True)
info.add_itxt("Description", "patient Zhang Wei", lang="en", tkey="Description")
info.add(b"tIME", struct.pack(">HBBBBB", 2026, 11, 28, 9, 15, 0))
img.save(d + "/photo.png", pnginfo=info, exif=exif)
"#;

/// Prints the pixel digest of a file, after verifying it (PNG: every CRC).
const PIXELS: &str = r#"
import sys, hashlib
from PIL import Image
p = sys.argv[1]
Image.open(p).verify()
im = Image.open(p)
im.load()
print(im.size, im.mode, hashlib.sha256(im.tobytes()).hexdigest())
"#;

/// exiftool's view of a file: every tag, with its group, as JSON.
fn exif_tags(file: &Path) -> serde_json::Map<String, serde_json::Value> {
    let out = Command::new("exiftool")
        .args(["-j", "-G1", "-a", "-u"])
        .arg(file)
        .output()
        .expect("exiftool runs (bash scripts/deps/photo-tools.sh)");
    assert!(out.status.success(), "exiftool: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0].as_object().unwrap().clone()
}

/// Tag groups that hold metadata a photo should not carry across the boundary.
const METADATA_GROUPS: &[&str] =
    &["IFD0", "ExifIFD", "GPS", "XMP", "XMP-dc", "IPTC", "Photoshop", "File:Comment", "PNG:", "PNG-", "IFD1"];

fn metadata_left(tags: &serde_json::Map<String, serde_json::Value>) -> Vec<String> {
    tags.iter()
        .filter(|(k, _)| {
            let group = k.split(':').next().unwrap_or("");
            METADATA_GROUPS.iter().any(|g| k.starts_with(g) || group == g.trim_end_matches(':'))
                && !matches!(
                    k.as_str(),
                    // What decoding needs (PNG header, colour, pixel size), not metadata.
                    "PNG:ImageWidth"
                        | "PNG:ImageHeight"
                        | "PNG:BitDepth"
                        | "PNG:ColorType"
                        | "PNG:Compression"
                        | "PNG:Filter"
                        | "PNG:Interlace"
                        | "PNG:PixelsPerUnitX"
                        | "PNG:PixelsPerUnitY"
                        | "PNG:PixelUnits"
                        | "PNG:SRGBRendering"
                        | "PNG:Gamma"
                )
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

#[test]
fn photos_lose_exif_gps_xmp_iptc_comments_and_text_and_keep_their_pixels() {
    let dir = tempfile::tempdir().unwrap();
    run_py(MAKE, &[dir.path()]);
    let deid = node::deid::Deidentifier::from_node_key(&ed25519_dalek::SigningKey::from_bytes(&[3; 32]));
    let ids = node::scrub::KnownIdentifiers::new("Zhang^Wei", "410102198001011234", "1980-01-01", "", "");
    for name in ["photo.jpg", "photo.png"] {
        let src = dir.path().join(name);
        let before = exif_tags(&src);
        // The test file really carries what it is meant to.
        let groups: Vec<&str> = before.keys().map(|k| k.split(':').next().unwrap()).collect();
        let expect: &[&str] =
            if name.ends_with("jpg") { &["IFD0", "GPS", "XMP-dc", "IPTC", "File"] } else { &["PNG", "IFD0", "GPS"] };
        for g in expect {
            assert!(groups.contains(g), "{name}: the test file has no {g} metadata: {before:#?}");
        }
        assert!(metadata_left(&before).len() >= 5, "{name}: {before:#?}");
        let dst = dir.path().join(format!("clean-{name}"));
        let method = node::scrub::clean_attachment(&deid, Default::default(), &ids, &src, &dst)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .expect("a photo is cleaned");
        assert!(method.contains(if name.ends_with("jpg") { "JPEG" } else { "PNG" }), "{method}");

        let after = exif_tags(&dst);
        let left = metadata_left(&after);
        assert!(left.is_empty(), "{name}: metadata left after cleaning: {left:#?}");
        let bytes = std::fs::read(&dst).unwrap();
        for needle in ["Zhang", "410102", "2026:11:28", "PhoneMaker"] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle.as_bytes()), "{name}: {needle} left");
        }
        // Pillow decodes the same pixels from both (and verifies every PNG CRC).
        let (p0, p1) = (run_py(PIXELS, &[&src]), run_py(PIXELS, &[&dst]));
        assert_eq!(p0, p1, "{name}: pixels changed");
        eprintln!("{name}: {} -> {} bytes, pixels {}", std::fs::metadata(&src).unwrap().len(), bytes.len(), p1.trim());
    }
    // A damaged photo is refused with the reason, never sent as it is.
    let jpg = std::fs::read(dir.path().join("photo.jpg")).unwrap();
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &jpg[..jpg.len() / 2]).unwrap();
    let err = node::scrub::clean_attachment(&deid, Default::default(), &ids, &cut, &dir.path().join("x")).unwrap_err();
    assert!(err.contains("JPEG"), "{err}");
    let png = std::fs::read(dir.path().join("photo.png")).unwrap();
    let mut bad = png.clone();
    let last = bad.len() - 20;
    bad[last] ^= 0xFF;
    let bad_path = dir.path().join("bad.png");
    std::fs::write(&bad_path, &bad).unwrap();
    let err =
        node::scrub::clean_attachment(&deid, Default::default(), &ids, &bad_path, &dir.path().join("y")).unwrap_err();
    assert!(err.contains("PNG"), "{err}");
}
