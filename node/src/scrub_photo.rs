//! Metadata removal for photographs attached to a case (issue #11): JPEG and PNG
//! files from phones and cameras carry EXIF (camera serial, date and time, GPS
//! position of the clinic or the patient's home), XMP and IPTC (names, captions,
//! keywords), comments and PNG text chunks. [`scrub_jpeg`] and [`scrub_png`] copy a
//! file keeping only what decoding needs, byte for byte:
//!
//! - **JPEG**: kept are SOI, the JFIF APP0, the ICC profile APP2 (colour), the
//!   Adobe APP14 (colour transform), DQT, DHT, DAC, DRI, every SOFn and SOS with
//!   its entropy-coded data (RSTn included) up to EOI. Removed are every other APPn
//!   (APP1 EXIF incl. GPS and XMP, APP13 IPTC/Photoshop, APP2 FlashPix/MPF, ...),
//!   COM, and anything after EOI (MPF secondary images, appended data).
//! - **PNG**: kept are the critical chunks (IHDR, PLTE, IDAT, IEND) and the
//!   ancillary chunks that change how pixels are shown (tRNS, gAMA, cHRM, sRGB,
//!   iCCP, cICP, mDCv, cLLi, sBIT, bKGD, hIST, pHYs, sPLT, APNG acTL/fcTL/fdAT),
//!   each with its own CRC (checked). Removed are tEXt, zTXt, iTXt, eXIf, tIME and
//!   every other ancillary chunk; an unknown critical chunk is refused.
//!
//! A file that does not parse is refused with the reason (the case is then
//! refused, never sent with the file as it is); every walk is bounded. This
//! module never changes the image data (the entropy-coded JPEG scans, the PNG IDAT
//! stream) and never reads text in the pixels: a photo of a face or of a name
//! badge stays what it is.

use crate::scrub::ScrubError;

/// Largest photo cleaned (in memory).
pub const PHOTO_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Most JPEG marker segments walked (a progressive JPEG has a few dozen).
const JPEG_SEGMENTS_MAX: usize = 10_000;
/// Most PNG chunks walked (IDAT split in 8 KiB chunks: 32 768 chunks is 256 MiB).
const PNG_CHUNKS_MAX: usize = 40_000;
/// Method text recorded for a cleaned JPEG.
pub const JPEG_METHOD: &str = "telemed-node JPEG: APPn metadata (EXIF/GPS, XMP, IPTC/Photoshop, ...), comments and trailing data removed; JFIF, ICC, Adobe, tables, frame and scans unchanged";
/// Method text recorded for a cleaned PNG.
pub const PNG_METHOD: &str = "telemed-node PNG: tEXt/zTXt/iTXt/eXIf/tIME and other non-rendering ancillary chunks removed; IHDR, palette, colour chunks and IDAT unchanged";

/// PNG's eight-byte signature.
pub const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1A, b'\n'];

/// Whether `head` starts like a JPEG (SOI then a marker).
pub fn is_jpeg(head: &[u8]) -> bool {
    head.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Whether `head` starts with the PNG signature.
pub fn is_png(head: &[u8]) -> bool {
    head.starts_with(&PNG_SIGNATURE)
}

/// What a photo lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhotoSummary {
    /// Segments (JPEG) or chunks (PNG) removed, by marker or chunk name.
    pub removed: Vec<String>,
    /// Bytes after the end of the image (EOI, IEND) dropped.
    pub trailing_bytes: usize,
}

fn jpeg_err(why: impl Into<String>) -> ScrubError {
    ScrubError::Jpeg(why.into())
}

/// The cleaned copy of the JPEG `bytes` (see the module doc).
pub fn scrub_jpeg(bytes: &[u8]) -> Result<(Vec<u8>, PhotoSummary), ScrubError> {
    if bytes.len() as u64 > PHOTO_BYTES_MAX {
        return Err(ScrubError::TooLarge {
            what: "the JPEG",
            bytes: bytes.len(),
            limit_bytes: PHOTO_BYTES_MAX as usize,
        });
    }
    if !is_jpeg(bytes) {
        return Err(jpeg_err("no SOI marker"));
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&[0xFF, 0xD8]);
    let mut summary = PhotoSummary::default();
    let mut pos = 2;
    let mut frame = false;
    for _ in 0..JPEG_SEGMENTS_MAX {
        // A marker: 0xFF, any fill 0xFF bytes, then the marker code.
        if bytes.get(pos) != Some(&0xFF) {
            return Err(jpeg_err(format!("expected a marker at byte {pos}")));
        }
        while bytes.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let marker = *bytes.get(pos).ok_or_else(|| jpeg_err("the file ends inside a marker"))?;
        pos += 1;
        match marker {
            0xD9 => {
                out.extend_from_slice(&[0xFF, 0xD9]);
                summary.trailing_bytes = bytes.len() - pos;
                if !frame {
                    return Err(jpeg_err("no frame (SOF) before EOI"));
                }
                return Ok((out, summary));
            }
            0x00 | 0xD0..=0xD8 | 0x01 => {
                return Err(jpeg_err(format!("unexpected marker FF{marker:02X} at byte {}", pos - 1)));
            }
            _ => {}
        }
        let len_at = pos;
        let len = bytes
            .get(pos..pos + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or_else(|| jpeg_err("the file ends inside a segment length"))?;
        if len < 2 || len_at + len > bytes.len() {
            return Err(jpeg_err(format!("segment FF{marker:02X} at byte {} has a bad length {len}", len_at - 2)));
        }
        let body = &bytes[len_at + 2..len_at + len];
        let segment = &bytes[len_at..len_at + len];
        pos = len_at + len;
        let keep = match marker {
            0xE0 => body.starts_with(b"JFIF\0"),
            0xE2 => body.starts_with(b"ICC_PROFILE\0"),
            0xEE => body.starts_with(b"Adobe"),
            0xE1 | 0xE3..=0xED | 0xEF | 0xFE => false,
            // Tables, restart interval, number of lines, hierarchical expansion.
            0xDB | 0xC4 | 0xCC | 0xDD | 0xDC | 0xDE | 0xDF => true,
            0xC0..=0xCF => {
                frame = true;
                true
            }
            0xDA => {
                if !frame {
                    return Err(jpeg_err("a scan (SOS) before any frame (SOF)"));
                }
                out.extend_from_slice(&[0xFF, 0xDA]);
                out.extend_from_slice(segment);
                // Entropy-coded data: up to the next marker that is not a stuffed
                // 0x00, a fill byte or RSTn.
                let start = pos;
                loop {
                    let Some(off) = bytes[pos..].iter().position(|&b| b == 0xFF) else {
                        return Err(jpeg_err("the file ends inside a scan (no EOI)"));
                    };
                    pos += off;
                    let next = *bytes.get(pos + 1).ok_or_else(|| jpeg_err("the file ends inside a scan"))?;
                    if next == 0x00 || (0xD0..=0xD7).contains(&next) {
                        pos += 2;
                    } else if next == 0xFF {
                        pos += 1;
                    } else {
                        break;
                    }
                }
                out.extend_from_slice(&bytes[start..pos]);
                continue;
            }
            other => return Err(jpeg_err(format!("unknown marker FF{other:02X}"))),
        };
        if keep {
            out.extend_from_slice(&[0xFF, marker]);
            out.extend_from_slice(segment);
        } else {
            let kind = match marker {
                0xFE => "COM".to_owned(),
                m => {
                    let id: String =
                        body.iter().take(12).take_while(|b| b.is_ascii_graphic()).map(|&b| b as char).collect();
                    format!("APP{} {id}", m - 0xE0)
                }
            };
            summary.removed.push(kind);
        }
    }
    Err(jpeg_err(format!("more than {JPEG_SEGMENTS_MAX} segments")))
}

/// Ancillary PNG chunks kept: they change how the pixels are shown.
const PNG_KEPT: &[&[u8; 4]] = &[
    b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"cICP", b"mDCv", b"cLLi", b"sBIT", b"bKGD", b"hIST", b"pHYs",
    b"sPLT", b"acTL", b"fcTL", b"fdAT",
];

fn png_err(why: impl Into<String>) -> ScrubError {
    ScrubError::Png(why.into())
}

/// The CRC-32 of PNG chunks (ISO 3309 / ITU-T V.42, as zlib's).
pub fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for part in parts {
        for &b in *part {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
    }
    !crc
}

/// The cleaned copy of the PNG `bytes` (see the module doc).
pub fn scrub_png(bytes: &[u8]) -> Result<(Vec<u8>, PhotoSummary), ScrubError> {
    if bytes.len() as u64 > PHOTO_BYTES_MAX {
        return Err(ScrubError::TooLarge {
            what: "the PNG",
            bytes: bytes.len(),
            limit_bytes: PHOTO_BYTES_MAX as usize,
        });
    }
    if !is_png(bytes) {
        return Err(png_err("no PNG signature"));
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&PNG_SIGNATURE);
    let mut summary = PhotoSummary::default();
    let mut pos = PNG_SIGNATURE.len();
    let mut first = true;
    for _ in 0..PNG_CHUNKS_MAX {
        let head =
            bytes.get(pos..pos + 8).ok_or_else(|| png_err(format!("the file ends at byte {pos}, before IEND")))?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind: [u8; 4] = [head[4], head[5], head[6], head[7]];
        let name = String::from_utf8_lossy(&kind).into_owned();
        if !kind.iter().all(u8::is_ascii_alphabetic) {
            return Err(png_err(format!("a chunk with a bad type at byte {pos}")));
        }
        if len > 0x7FFF_FFFF || pos + 12 + len > bytes.len() {
            return Err(png_err(format!("chunk {name} at byte {pos} runs past the end of the file")));
        }
        let data = &bytes[pos + 8..pos + 8 + len];
        let stored = &bytes[pos + 8 + len..pos + 12 + len];
        let crc = u32::from_be_bytes([stored[0], stored[1], stored[2], stored[3]]);
        if crc != crc32(&[&kind, data]) {
            return Err(png_err(format!("chunk {name} at byte {pos} has a bad CRC")));
        }
        if first && &kind != b"IHDR" {
            return Err(png_err("the first chunk is not IHDR"));
        }
        first = false;
        let chunk = &bytes[pos..pos + 12 + len];
        pos += 12 + len;
        let critical = kind[0].is_ascii_uppercase();
        match &kind {
            b"IHDR" | b"PLTE" | b"IDAT" => out.extend_from_slice(chunk),
            b"IEND" => {
                out.extend_from_slice(chunk);
                summary.trailing_bytes = bytes.len() - pos;
                return Ok((out, summary));
            }
            _ if critical => return Err(png_err(format!("unknown critical chunk {name}"))),
            k if PNG_KEPT.contains(&k) => out.extend_from_slice(chunk),
            _ => summary.removed.push(name),
        }
    }
    Err(png_err(format!("more than {PNG_CHUNKS_MAX} chunks")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(marker: u8, body: &[u8]) -> Vec<u8> {
        let mut s = vec![0xFF, marker];
        s.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        s.extend_from_slice(body);
        s
    }

    /// A structurally complete JPEG (tables and scan bytes are opaque here).
    fn jpeg(extra: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
        let mut image = Vec::new();
        image.extend(segment(0xDB, &[0; 65]));
        image.extend(segment(0xC0, &[8, 0, 1, 0, 1, 1, 1, 0x11, 0]));
        image.extend(segment(0xC4, &[0; 20]));
        image.extend(segment(0xDA, &[1, 1, 0, 0, 63, 0]));
        image.extend([0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56, 0xFF, 0xFF, 0xD1, 0x78]);
        let mut file = vec![0xFF, 0xD8];
        file.extend(segment(0xE0, b"JFIF\0\x01\x02\0\0\x01\0\x01\0\0"));
        for e in extra {
            file.extend_from_slice(e);
        }
        file.extend_from_slice(&image);
        file.extend([0xFF, 0xD9]);
        (file, image)
    }

    #[test]
    fn jpeg_metadata_segments_go_and_the_image_bytes_stay() {
        let exif = segment(0xE1, b"Exif\0\0MM\0*GPS Zhang Wei");
        let xmp = segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta>Zhang</x:xmpmeta>");
        let iptc = segment(0xED, b"Photoshop 3.0\08BIM\x04\x04Zhang");
        let com = segment(0xFE, b"patient Zhang Wei");
        let (mut file, image) = jpeg(&[exif, xmp, iptc, com]);
        file.extend_from_slice(b"appended Zhang");
        let (out, summary) = scrub_jpeg(&file).unwrap();
        assert!(!out.windows(5).any(|w| w == b"Zhang"), "a name is left");
        assert_eq!(summary.removed.len(), 4, "{summary:?}");
        assert_eq!(summary.trailing_bytes, 14);
        assert!(out.windows(image.len()).any(|w| w == image.as_slice()), "tables, frame and scan unchanged");
        assert!(out.starts_with(&[0xFF, 0xD8, 0xFF, 0xE0]) && out.ends_with(&[0xFF, 0xD9]));
        // Cleaning again changes nothing.
        assert_eq!(scrub_jpeg(&out).unwrap().0, out);
    }

    #[test]
    fn malformed_jpegs_are_refused_with_the_reason_never_a_panic() {
        let (good, _) = jpeg(&[segment(0xE1, b"Exif\0\0")]);
        // Every truncation is an error, none a panic.
        for n in 0..good.len() - 1 {
            assert!(scrub_jpeg(&good[..n]).is_err(), "cut at {n} accepted");
        }
        let mut bad_len = good.clone();
        bad_len[4..6].copy_from_slice(&0xFFFFu16.to_be_bytes());
        assert!(scrub_jpeg(&bad_len).unwrap_err().to_string().contains("bad length"));
        let mut no_frame = vec![0xFF, 0xD8];
        no_frame.extend(segment(0xDA, &[0]));
        assert!(scrub_jpeg(&no_frame).unwrap_err().to_string().contains("before any frame"));
        assert!(scrub_jpeg(b"\xFF\xD8\xFF\xD9").unwrap_err().to_string().contains("no frame"));
        // Arbitrary bytes after the SOI never panic.
        let mut x: u32 = 7;
        for _ in 0..2_000 {
            let mut f = vec![0xFF, 0xD8, 0xFF];
            for _ in 0..64 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                f.push((x >> 16) as u8);
            }
            let _ = scrub_jpeg(&f);
        }
    }

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        c.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
        c
    }

    #[test]
    fn png_text_and_time_chunks_go_and_the_rest_stays_byte_identical() {
        assert_eq!(crc32(&[b"IEND"]), 0xAE42_6082, "the well-known IEND CRC");
        let ihdr = chunk(b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 0, 0, 0, 0]);
        let idat = chunk(b"IDAT", &[0x78, 0x9C, 0x63, 0x60, 0, 0, 0, 2, 0, 1]);
        let phys = chunk(b"pHYs", &[0, 0, 0x0B, 0x13, 0, 0, 0x0B, 0x13, 1]);
        let mut file = PNG_SIGNATURE.to_vec();
        for c in [
            ihdr.clone(),
            chunk(b"tEXt", b"Author\0Zhang Wei"),
            chunk(b"zTXt", b"Comment\0\0x"),
            chunk(b"iTXt", b"Name\0\0\0\0\0Zhang"),
            chunk(b"eXIf", b"MM\0*Zhang"),
            chunk(b"tIME", &[7, 0xEA, 11, 28, 9, 0, 0]),
            chunk(b"prVt", b"Zhang"),
            phys.clone(),
            idat.clone(),
            chunk(b"IEND", b""),
        ] {
            file.extend(c);
        }
        file.extend_from_slice(b"Zhang");
        let (out, summary) = scrub_png(&file).unwrap();
        assert_eq!(summary.removed, ["tEXt", "zTXt", "iTXt", "eXIf", "tIME", "prVt"]);
        let mut expect = PNG_SIGNATURE.to_vec();
        for c in [ihdr, phys, idat, chunk(b"IEND", b"")] {
            expect.extend(c);
        }
        assert_eq!(out, expect);
    }

    #[test]
    fn malformed_pngs_are_refused_with_the_reason() {
        let ihdr = chunk(b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 0, 0, 0, 0]);
        let mut good = PNG_SIGNATURE.to_vec();
        good.extend(&ihdr);
        good.extend(chunk(b"IEND", b""));
        assert!(scrub_png(&good).is_ok());
        for n in 0..good.len() {
            assert!(scrub_png(&good[..n]).is_err(), "cut at {n} accepted");
        }
        let mut bad_crc = good.clone();
        bad_crc[20] ^= 1;
        assert!(scrub_png(&bad_crc).unwrap_err().to_string().contains("bad CRC"));
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(scrub_png(&huge).unwrap_err().to_string().contains("past the end"));
        let mut critical = PNG_SIGNATURE.to_vec();
        critical.extend(&ihdr);
        critical.extend(chunk(b"ZZZZ", b""));
        assert!(scrub_png(&critical).unwrap_err().to_string().contains("unknown critical"));
    }

    #[test]
    fn mutated_photos_never_panic_and_what_is_cleaned_cleans_to_itself() {
        // The fuzz target's oracle (fuzz/fuzz_targets/photo_scrub.rs), on seeded
        // byte flips, cuts and insertions of a JPEG and a PNG.
        let (jpeg_file, _) = jpeg(&[segment(0xE1, b"Exif\0\0MM"), segment(0xFE, b"c")]);
        let mut png_file = PNG_SIGNATURE.to_vec();
        png_file.extend(chunk(b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 0, 0, 0, 0]));
        png_file.extend(chunk(b"tEXt", b"a\0b"));
        png_file.extend(chunk(b"IDAT", &[1, 2, 3]));
        png_file.extend(chunk(b"IEND", b""));
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let (mut ok_jpeg, mut ok_png) = (0, 0);
        for round in 0..20_000 {
            let base = if round % 2 == 0 { &jpeg_file } else { &png_file };
            let mut f = base.clone();
            for _ in 0..1 + next(3) {
                let i = next(f.len());
                match next(3) {
                    0 => f[i] = next(256) as u8,
                    1 => f.truncate(i.max(4)),
                    _ => f.insert(i, next(256) as u8),
                }
            }
            if let Ok((clean, _)) = scrub_jpeg(&f) {
                ok_jpeg += 1;
                assert!(clean.len() <= f.len());
                assert_eq!(scrub_jpeg(&clean).unwrap().0, clean, "{f:02X?}");
            }
            if let Ok((clean, _)) = scrub_png(&f) {
                ok_png += 1;
                assert!(clean.len() <= f.len());
                assert_eq!(scrub_png(&clean).unwrap().0, clean, "{f:02X?}");
            }
        }
        // Most PNG mutations break a CRC and are refused; a few (after IEND) pass.
        assert!(ok_jpeg > 100 && ok_png > 0, "the mutations reach the cleaning code: {ok_jpeg} {ok_png}");
    }
}
