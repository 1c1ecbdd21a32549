//! DICOM images: the first frame as `f32` samples (after the modality rescale),
//! with the attributes a triage model or a viewer needs (modality, body part,
//! view position, photometric interpretation, default window), a DICOM
//! window → 8-bit grey renderer and a box-filter downsampler for models.
//!
//! Decoding goes through dicom-pixeldata with pure-Rust codecs only: native
//! and deflated data, RLE, JPEG (baseline, extended, lossless) and JPEG 2000
//! (openjp2). JPEG-LS and JPEG XL need codecs this build leaves out and are
//! reported as unsupported.
//!
//! Before anything is decoded the file's structure is walked (no allocation
//! from an unchecked length) and the frame size `rows × columns × samples` is
//! held to [`FRAME_SAMPLES_MAX`]; the decoded frame must have exactly that
//! size. Codec panics on hostile data are caught and reported as malformed
//! input: a reader never takes the node down.

use std::path::Path;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder, VoiLutOption};

use super::{FILE_BYTES_MAX, ReadError, dicom_number as number, dicom_text as text, parse_dicom, read_file_limited};

const FORMAT: &str = "DICOM image";

/// Most samples (rows × columns × samples per pixel) in the frame read: 64 Mi,
/// enough for an 8k × 8k radiograph or a 4k × 4k RGB image (256 MiB as `f32`).
pub const FRAME_SAMPLES_MAX: u64 = 64 * 1024 * 1024;

/// A VOI window: values in `center ± width / 2` span black to white.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub center: f32,
    pub width: f32,
}

/// The first frame of a DICOM image and the attributes that describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomImage {
    pub rows: u32,
    pub columns: u32,
    /// 1 (grey) or 3 (RGB, interleaved per pixel).
    pub samples_per_pixel: u16,
    /// Row-major samples of the first frame: for grey images after the
    /// modality rescale (slope/intercept: Hounsfield units for CT), for colour
    /// images the decoded RGB values.
    pub pixels: Vec<f32>,
    /// Photometric Interpretation as stored (e.g. "MONOCHROME1",
    /// "MONOCHROME2", "RGB", "YBR_RCT"); colour images are RGB in `pixels`
    /// whatever the stored encoding.
    pub photometric_interpretation: String,
    pub modality: Option<String>,
    pub body_part_examined: Option<String>,
    pub view_position: Option<String>,
    /// The first default window of the file (Window Center / Width), if any.
    pub window: Option<Window>,
    pub number_of_frames: u32,
    pub transfer_syntax: String,
    pub sop_class_uid: String,
}

impl DicomImage {
    /// MONOCHROME1: higher values are darker (many radiographs).
    pub fn inverted(&self) -> bool {
        self.photometric_interpretation == "MONOCHROME1"
    }

    /// One grey value per pixel: the samples themselves, or the luminance
    /// (ITU-R BT.601 weights) of RGB.
    pub fn grey(&self) -> Vec<f32> {
        match self.samples_per_pixel {
            3 => self.pixels.chunks_exact(3).map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]).collect(),
            _ => self.pixels.clone(),
        }
    }

    /// The file's default window, else one spanning the grey values' range.
    pub fn default_window(&self) -> Window {
        if let Some(w) = self.window {
            return w;
        }
        let (lo, hi) =
            self.grey().iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        if lo.is_finite() && hi.is_finite() {
            Window { center: (lo + hi) / 2.0, width: (hi - lo).max(1.0) }
        } else {
            Window { center: 0.0, width: 1.0 }
        }
    }

    /// Renders the grey values through a window to 8-bit grey (row-major,
    /// `rows × columns`), with the DICOM linear VOI function (PS3.3
    /// C.11.2.1.2.1); MONOCHROME1 images are inverted so that 255 is white.
    /// A width below 1 is taken as 1.
    pub fn render_window(&self, center: f32, width: f32) -> Vec<u8> {
        let invert = self.inverted();
        self.grey().into_iter().map(|v| window_to_u8(v, center, width, invert)).collect()
    }

    /// The grey image reduced (or enlarged) to `width × height` by averaging
    /// the source pixels under each output pixel (box filter; nearest
    /// neighbour when enlarging), row-major, still in rescaled units.
    pub fn downsample(&self, width: u32, height: u32) -> Vec<f32> {
        box_resize(&self.grey(), self.columns as usize, self.rows as usize, width as usize, height as usize)
    }

    /// What a model takes: the default window applied (0 = black, 1 = white,
    /// MONOCHROME1 inverted), then reduced to `width × height`.
    pub fn model_input(&self, width: u32, height: u32) -> Vec<f32> {
        let w = self.default_window();
        let invert = self.inverted();
        let grey: Vec<f32> =
            self.grey().into_iter().map(|v| f32::from(window_to_u8(v, w.center, w.width, invert)) / 255.0).collect();
        box_resize(&grey, self.columns as usize, self.rows as usize, width as usize, height as usize)
    }
}

fn window_to_u8(v: f32, center: f32, width: f32, invert: bool) -> u8 {
    let (c, w) = (center - 0.5, (width - 1.0).max(0.0));
    let y = if v <= c - w / 2.0 {
        0.0
    } else if v > c + w / 2.0 || w == 0.0 {
        255.0
    } else {
        ((v - c) / w + 0.5) * 255.0
    };
    let y = y.round().clamp(0.0, 255.0) as u8;
    if invert { 255 - y } else { y }
}

/// Box-filter resize of a row-major `sw × sh` grey image to `dw × dh`.
pub(crate) fn box_resize(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    if sw == 0 || sh == 0 || src.len() < sw * sh {
        return vec![0.0; dw * dh];
    }
    let span = |o: usize, d: usize, s: usize| {
        let a = o * s / d;
        let b = ((o + 1) * s / d).max(a + 1).min(s);
        (a.min(s - 1), b)
    };
    let mut out = Vec::with_capacity(dw * dh);
    for oy in 0..dh {
        let (y0, y1) = span(oy, dh, sh);
        for ox in 0..dw {
            let (x0, x1) = span(ox, dw, sw);
            let mut sum = 0.0f64;
            for y in y0..y1 {
                sum += src[y * sw + x0..y * sw + x1].iter().map(|&v| f64::from(v)).sum::<f64>();
            }
            out.push((sum / ((y1 - y0) * (x1 - x0)) as f64) as f32);
        }
    }
    out
}

/// Reads the first frame of a DICOM image (a Part-10 file in memory).
pub fn read_dicom_image(bytes: &[u8]) -> Result<DicomImage, ReadError> {
    image_from_dicom(&parse_dicom(bytes)?)
}

/// [`read_dicom_image`] on an object already parsed.
pub(crate) fn image_from_dicom(obj: &dicom_object::DefaultDicomObject) -> Result<DicomImage, ReadError> {
    let rows = required_u32(obj, tags::ROWS, "Rows")?;
    let columns = required_u32(obj, tags::COLUMNS, "Columns")?;
    let samples_per_pixel = number(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1.0);
    if samples_per_pixel != 1.0 && samples_per_pixel != 3.0 {
        return Err(ReadError::unsupported(FORMAT, format!("{samples_per_pixel} samples per pixel (1 or 3)")));
    }
    let samples_per_pixel = samples_per_pixel as u16;
    let frame_samples = u64::from(rows) * u64::from(columns) * u64::from(samples_per_pixel);
    if rows == 0 || columns == 0 {
        return Err(ReadError::malformed(FORMAT, format!("{rows} × {columns} pixels")));
    }
    if frame_samples > FRAME_SAMPLES_MAX {
        return Err(ReadError::TooLarge {
            what: format!("a {columns} × {rows} × {samples_per_pixel} DICOM frame"),
            bytes: frame_samples * 4,
            limit_bytes: FRAME_SAMPLES_MAX * 4,
        });
    }
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err(ReadError::malformed(FORMAT, "no Pixel Data"));
    }
    let number_of_frames = match number(obj, tags::NUMBER_OF_FRAMES) {
        Some(n) if n >= 1.0 && n.fract() == 0.0 && n <= f64::from(u32::MAX) => n as u32,
        Some(n) => return Err(ReadError::malformed(FORMAT, format!("Number of Frames {n}"))),
        None => 1,
    };
    let transfer_syntax = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']).to_string();

    // dicom-pixeldata checks native pixel data lengths itself; codecs decode
    // what the compressed stream says, so the result's size is checked after.
    let frame = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let decoded = obj.decode_pixel_data_frame(0)?;
        let options = ConvertOptions::new()
            .with_modality_lut(if samples_per_pixel == 1 {
                ModalityLutOption::Default
            } else {
                ModalityLutOption::None
            })
            .with_voi_lut(VoiLutOption::Identity);
        decoded.to_vec_frame_with_options::<f32>(0, &options)
    }))
    .map_err(|_| ReadError::malformed(FORMAT, format!("the {transfer_syntax} pixel data decoder panicked")))?
    .map_err(|e| decode_error(&transfer_syntax, e))?;
    if frame.len() as u64 != frame_samples {
        return Err(ReadError::malformed(
            FORMAT,
            format!("decoded frame has {} samples, {columns} × {rows} × {samples_per_pixel} expected", frame.len()),
        ));
    }
    Ok(DicomImage {
        rows,
        columns,
        samples_per_pixel,
        pixels: frame,
        photometric_interpretation: text(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default(),
        modality: text(obj, tags::MODALITY),
        body_part_examined: text(obj, tags::BODY_PART_EXAMINED),
        view_position: text(obj, tags::VIEW_POSITION),
        window: match (number(obj, tags::WINDOW_CENTER), number(obj, tags::WINDOW_WIDTH)) {
            (Some(c), Some(w)) if c.is_finite() && w.is_finite() && w > 0.0 => {
                Some(Window { center: c as f32, width: w as f32 })
            }
            _ => None,
        },
        number_of_frames,
        transfer_syntax,
        sop_class_uid: text(obj, tags::SOP_CLASS_UID).unwrap_or_default(),
    })
}

/// [`read_dicom_image`] on a file (at most [`FILE_BYTES_MAX`] bytes).
pub fn read_dicom_image_file(path: impl AsRef<Path>) -> Result<DicomImage, ReadError> {
    read_dicom_image(&read_file_limited(path.as_ref(), FILE_BYTES_MAX)?)
}

fn decode_error(transfer_syntax: &str, e: dicom_pixeldata::Error) -> ReadError {
    let msg = e.to_string();
    let msg = match std::error::Error::source(&e) {
        Some(source) => format!("{msg}: {source}"),
        None => msg,
    };
    if msg.contains("nsupported") || msg.contains("nknown transfer syntax") {
        ReadError::unsupported(FORMAT, format!("pixel data in transfer syntax {transfer_syntax}: {msg}"))
    } else {
        ReadError::malformed(FORMAT, format!("pixel data ({transfer_syntax}) does not decode: {msg}"))
    }
}

fn required_u32(obj: &InMemDicomObject, tag: Tag, name: &str) -> Result<u32, ReadError> {
    match number(obj, tag) {
        Some(n) if n >= 0.0 && n.fract() == 0.0 && n <= f64::from(u32::MAX) => Ok(n as u32),
        Some(n) => Err(ReadError::malformed(FORMAT, format!("{name} {n}"))),
        None => Err(ReadError::malformed(FORMAT, format!("no (readable) {name}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readers::test_support::{flips, testdata, truncations};

    #[test]
    fn ct_small_is_a_128_square_ct_slice_in_hounsfield_units() {
        let img = read_dicom_image(&testdata("CT_small.dcm")).unwrap();
        assert_eq!((img.rows, img.columns, img.samples_per_pixel), (128, 128, 1));
        assert_eq!(img.modality.as_deref(), Some("CT"));
        assert_eq!(img.photometric_interpretation, "MONOCHROME2");
        assert_eq!(img.pixels.len(), 128 * 128);
        // pydicom 3.0.2: ds.pixel_array[0, :3] is [175, 180, 166] (signed 16-bit),
        // RescaleSlope 1, RescaleIntercept -1024.
        assert_eq!(&img.pixels[..3], &[175.0 - 1024.0, 180.0 - 1024.0, 166.0 - 1024.0]);
        // Air outside the body is far below water, soft tissue around it.
        let min = img.pixels.iter().copied().fold(f32::INFINITY, f32::min);
        let max = img.pixels.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert!(min < -800.0 && max > 0.0, "range {min}..{max}");
        assert_eq!(img.window, None);
        let rendered = img.render_window(40.0, 400.0);
        assert_eq!(rendered.len(), 128 * 128);
        assert!(rendered.contains(&0) && rendered.contains(&255));
    }

    #[test]
    fn us1_jpeg_2000_lossless_decodes_to_the_same_pixels_as_pydicom() {
        let img = read_dicom_image(&testdata("US1_J2KR.dcm")).unwrap();
        assert_eq!((img.rows, img.columns, img.samples_per_pixel), (480, 640, 3));
        assert_eq!(img.modality.as_deref(), Some("US"));
        assert_eq!(img.transfer_syntax, "1.2.840.10008.1.2.4.90");
        // pydicom 3.0.2 + pylibjpeg-openjpeg: ds.pixel_array[200, 300] and the
        // per-channel sums of the whole frame.
        let at = (200 * 640 + 300) * 3;
        assert_eq!(&img.pixels[at..at + 3], &US1_PIXEL_200_300);
        let sums =
            (0..3).map(|c| img.pixels.iter().skip(c).step_by(3).map(|&v| v as u64).sum::<u64>()).collect::<Vec<_>>();
        assert_eq!(sums, US1_CHANNEL_SUMS);
    }

    // From pydicom 3.0.2 with pylibjpeg-openjpeg 2.6.0 (which applies the
    // inverse RCT): `a = ds.pixel_array; a[200, 300]` and
    // `[int(a[..., c].astype(np.uint64).sum()) for c in range(3)]`.
    const US1_PIXEL_200_300: [f32; 3] = [93.0; 3];
    const US1_CHANNEL_SUMS: [u64; 3] = [12_402_304, 10_599_055, 8_820_377];

    #[test]
    fn pydicom_data_chest_radiograph_decodes_as_a_pa_chest_cr() {
        let img = read_dicom_image(&testdata("RG1_J2KI.dcm")).unwrap();
        assert_eq!((img.rows, img.columns, img.samples_per_pixel), (1955, 1841, 1));
        assert_eq!(img.modality.as_deref(), Some("CR"));
        assert_eq!(img.body_part_examined.as_deref(), Some("CHEST"));
        assert_eq!(img.view_position.as_deref(), Some("PA"));
        assert_eq!(img.photometric_interpretation, "MONOCHROME1");
        assert_eq!(img.window, Some(Window { center: 15000.0, width: 30000.0 }));
        // pydicom 3.0.2 + pylibjpeg-openjpeg 2.6.0: `a = ds.pixel_array`,
        // a[1000, 900] and a.astype(np.uint64).sum() (lossy JPEG 2000; openjp2
        // is a port of the same OpenJPEG decoder).
        assert_eq!(img.pixels[1000 * 1841 + 900], 3521.0);
        assert_eq!(img.pixels.iter().map(|&v| v as u64).sum::<u64>(), 26_602_973_060);
        let small = img.model_input(64, 64);
        assert_eq!(small.len(), 64 * 64);
        assert!(small.iter().all(|v| (0.0..=1.0).contains(v)));
        // Lungs (left and right of the centre, mid-height) are darker than the
        // mediastinum between them, as on any PA chest film.
        let mean = |x0: usize, x1: usize, y0: usize, y1: usize| {
            let mut s = 0.0;
            for y in y0..y1 {
                for x in x0..x1 {
                    s += small[y * 64 + x];
                }
            }
            s / ((x1 - x0) * (y1 - y0)) as f32
        };
        let (left, middle, right) = (mean(12, 22, 20, 40), mean(28, 36, 20, 40), mean(42, 52, 20, 40));
        assert!(middle > left + 0.05 && middle > right + 0.05, "lungs {left} {right}, mediastinum {middle}");
    }

    #[test]
    fn pydicom_data_tibia_radiograph_decodes_as_an_extremity() {
        let img = read_dicom_image(&testdata("RG3_J2KI.dcm")).unwrap();
        assert_eq!((img.rows, img.columns), (1760, 1760));
        assert_eq!(img.modality.as_deref(), Some("CR"));
        assert_eq!(img.body_part_examined.as_deref(), Some("EXTREMITY"));
        assert_eq!(img.view_position.as_deref(), Some("AP"));
    }

    #[test]
    fn window_rendering_follows_the_dicom_linear_function() {
        // center 50, width 11: below 44.5 black, above 55.5 white.
        assert_eq!(window_to_u8(44.0, 50.0, 11.0, false), 0);
        assert_eq!(window_to_u8(56.0, 50.0, 11.0, false), 255);
        assert_eq!(window_to_u8(49.5, 50.0, 11.0, false), 128);
        assert_eq!(window_to_u8(56.0, 50.0, 11.0, true), 0);
        // Width 1: a threshold at the centre.
        assert_eq!(window_to_u8(49.0, 50.0, 1.0, false), 0);
        assert_eq!(window_to_u8(50.0, 50.0, 1.0, false), 255);
    }

    #[test]
    fn box_resize_averages_blocks_and_enlarges_by_nearest() {
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect(); // 4 × 4
        assert_eq!(box_resize(&src, 4, 4, 2, 2), vec![2.5, 4.5, 10.5, 12.5]);
        assert_eq!(box_resize(&[1.0, 2.0], 2, 1, 4, 1), vec![1.0, 1.0, 2.0, 2.0]);
        assert_eq!(box_resize(&src, 4, 4, 1, 1), vec![7.5]);
    }

    #[test]
    fn truncated_or_corrupted_images_give_errors_not_panics() {
        for name in ["CT_small.dcm", "US1_J2KR.dcm"] {
            let bytes = testdata(name);
            for (what, b) in truncations(&bytes) {
                let err = read_dicom_image(&b).map(|i| i.rows).unwrap_err().to_string();
                assert!(err.contains("DICOM"), "{name} {what}: {err}");
            }
            for (what, b) in flips(&bytes, 60) {
                match std::panic::catch_unwind(|| read_dicom_image(&b)) {
                    Ok(Ok(img)) => {
                        assert_eq!(img.pixels.len() as u32, img.rows * img.columns * u32::from(img.samples_per_pixel))
                    }
                    Ok(Err(_)) => {}
                    Err(_) => panic!("{name} {what}: panicked"),
                }
            }
        }
    }

    #[test]
    fn a_waveform_is_not_an_image() {
        let err = read_dicom_image(&testdata("waveform_ecg.dcm")).unwrap_err().to_string();
        assert!(err.contains("no (readable) Rows"), "{err}");
    }
}
