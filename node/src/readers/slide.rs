//! Whole-slide pathology images in tiled TIFF, including Aperio SVS: the
//! pyramid levels (every tiled image in the file, largest first) and single
//! tiles as 8-bit RGB.
//!
//! A slide is never decoded whole: [`Slide::read_tile`] reads and decodes one
//! tile, so memory stays at a few tiles whatever the slide's size. The file
//! stays open and is read by offset. Limits: at most [`IFDS_MAX`] images in
//! the file, tiles of at most [`TILE_BYTES_MAX`] decoded and
//! [`TILE_COMPRESSED_BYTES_MAX`] compressed, every tile's offset and length
//! checked against the file length before reading.
//!
//! JPEG tiles (compression 7, the usual SVS case) carry only their scan; the
//! Huffman and quantisation tables sit once in the image's `JPEGTables` tag.
//! They are spliced in front of each tile (tables without their end marker,
//! tile without its start marker) and decoded with zune-jpeg, bounded to the
//! tile's size. Photometric RGB means the JPEG components are R, G, B as
//! stored (Aperio's convention, as OpenSlide reads it): no colour transform;
//! photometric YCbCr is converted to RGB. Other compressions (none, LZW,
//! deflate, PackBits) go through the tiff crate's own tile decoder. JPEG 2000
//! tiles (Aperio 33003/33005) are reported as unsupported.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use tiff::decoder::{ChunkType, Decoder, DecodingResult, Limits};
use tiff::tags::Tag;

use super::ReadError;

const FORMAT: &str = "TIFF slide";

/// Most images (IFDs) looked at in one file.
pub const IFDS_MAX: usize = 64;
/// Largest decoded tile accepted (RGB8 bytes): 2048 × 2048 × 3 = 12 MiB.
pub const TILE_BYTES_MAX: usize = 2048 * 2048 * 3;
/// Largest compressed tile read.
pub const TILE_COMPRESSED_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Largest tag value (tile offset tables, JPEG tables, descriptions).
pub const TAG_BYTES_MAX: usize = 32 * 1024 * 1024;

/// One pyramid level (a tiled image in the file).
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    /// Index of the image (IFD) in the file.
    pub ifd: usize,
    pub width: u32,
    pub height: u32,
    pub tile_width: u32,
    pub tile_height: u32,
    pub tiles_across: u32,
    pub tiles_down: u32,
    /// Level 0's width divided by this level's.
    pub downsample: f64,
    compression: u16,
    photometric: u16,
    tile_offsets: Vec<u64>,
    tile_byte_counts: Vec<u64>,
    jpeg_tables: Option<Vec<u8>>,
}

/// One decoded tile: 8-bit RGB, row-major. Edge tiles are cropped to the
/// image, so `width`/`height` may be smaller than the level's tile size.
#[derive(Debug, Clone, PartialEq)]
pub struct Tile {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// An open slide.
pub struct Slide<R: Read + Seek = BufReader<File>> {
    decoder: Decoder<R>,
    file_len: u64,
    levels: Vec<Level>,
    /// The first image's ImageDescription (Aperio: scanner, `AppMag`, `MPP`).
    pub description: String,
}

impl<R: Read + Seek> std::fmt::Debug for Slide<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slide").field("levels", &self.levels).field("description", &self.description).finish()
    }
}

fn tiff_error(e: tiff::TiffError) -> ReadError {
    match e {
        tiff::TiffError::UnsupportedError(u) => ReadError::unsupported(FORMAT, u.to_string()),
        tiff::TiffError::LimitsExceeded => ReadError::malformed(FORMAT, "a value exceeds the reader's limits"),
        other => ReadError::malformed(FORMAT, other.to_string()),
    }
}

impl Slide {
    /// Opens a slide file; reads only the image directories and their tile
    /// tables.
    pub fn open(path: impl AsRef<Path>) -> Result<Slide, ReadError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| ReadError::Io { path: path.to_path_buf(), source })?;
        Slide::from_reader(BufReader::new(file))
    }
}

impl<R: Read + Seek> Slide<R> {
    /// A slide read from any seekable source (a file, or bytes in memory).
    pub fn from_reader(mut reader: R) -> Result<Slide<R>, ReadError> {
        let file_len = reader
            .seek(SeekFrom::End(0))
            .and_then(|len| reader.seek(SeekFrom::Start(0)).map(|_| len))
            .map_err(|e| ReadError::malformed(FORMAT, format!("cannot seek: {e}")))?;
        let mut limits = Limits::default();
        limits.decoding_buffer_size = TILE_BYTES_MAX;
        limits.ifd_value_size = TAG_BYTES_MAX;
        limits.intermediate_buffer_size = TILE_BYTES_MAX;
        let mut decoder = Decoder::new(reader).map_err(tiff_error)?.with_limits(limits);
        let description = decoder.get_tag_ascii_string(Tag::ImageDescription).unwrap_or_default();
        let mut levels = Vec::new();
        let mut ifd = 0;
        loop {
            if decoder.get_chunk_type() == ChunkType::Tile {
                levels.push(read_level(&mut decoder, ifd, file_len)?);
            }
            if !decoder.more_images() {
                break;
            }
            ifd += 1;
            if ifd >= IFDS_MAX {
                return Err(ReadError::malformed(FORMAT, format!("more than {IFDS_MAX} images")));
            }
            decoder.next_image().map_err(tiff_error)?;
        }
        if levels.is_empty() {
            return Err(ReadError::unsupported(FORMAT, "no tiled image (a plain stripped TIFF, not a slide)"));
        }
        levels.sort_by(|a, b| b.width.cmp(&a.width).then(a.ifd.cmp(&b.ifd)));
        let base = f64::from(levels[0].width);
        for l in &mut levels {
            l.downsample = base / f64::from(l.width);
        }
        Ok(Slide { decoder, file_len, levels, description })
    }

    /// The pyramid levels, largest first.
    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// Aperio's objective magnification (`AppMag = 20`), if the description
    /// has one.
    pub fn objective_magnification(&self) -> Option<f32> {
        aperio_field(&self.description, "AppMag")
    }

    /// Aperio's microns per pixel at level 0 (`MPP = 0.499`), if given.
    pub fn microns_per_pixel(&self) -> Option<f32> {
        aperio_field(&self.description, "MPP")
    }

    /// Decodes tile (`tx`, `ty`) of `level` (0 = largest).
    pub fn read_tile(&mut self, level: usize, tx: u32, ty: u32) -> Result<Tile, ReadError> {
        let l = self
            .levels
            .get(level)
            .ok_or_else(|| ReadError::malformed(FORMAT, format!("no level {level} ({} levels)", self.levels.len())))?;
        if tx >= l.tiles_across || ty >= l.tiles_down {
            return Err(ReadError::malformed(
                FORMAT,
                format!("no tile ({tx}, {ty}) at level {level}: {} × {} tiles", l.tiles_across, l.tiles_down),
            ));
        }
        let index = (ty * l.tiles_across + tx) as usize;
        let (width, height) =
            (l.tile_width.min(l.width - tx * l.tile_width), l.tile_height.min(l.height - ty * l.tile_height));
        if l.compression == 7 {
            let (offset, count) = (l.tile_offsets[index], l.tile_byte_counts[index]);
            let (photometric, tw, th) = (l.photometric, l.tile_width, l.tile_height);
            let tables = l.jpeg_tables.clone();
            let raw = self.read_raw(offset, count)?;
            let full = decode_jpeg_tile(tables.as_deref(), &raw, photometric, tw, th)
                .map_err(|why| ReadError::malformed(FORMAT, format!("tile ({tx}, {ty}) at level {level}: {why}")))?;
            return Ok(crop(full, tw, width, height));
        }
        let ifd = l.ifd;
        self.decoder.seek_to_image(ifd).map_err(tiff_error)?;
        let (dw, dh) = self.decoder.chunk_data_dimensions(index as u32);
        let colortype = self.decoder.colortype().map_err(tiff_error)?;
        let data = match self.decoder.read_chunk(index as u32).map_err(tiff_error)? {
            DecodingResult::U8(data) => data,
            _ => {
                return Err(ReadError::unsupported(
                    FORMAT,
                    format!("{colortype:?} samples (8-bit RGB or grey expected)"),
                ));
            }
        };
        let rgb = match colortype {
            tiff::ColorType::RGB(8) => data,
            tiff::ColorType::Gray(8) => data.iter().flat_map(|&g| [g, g, g]).collect(),
            other => {
                return Err(ReadError::unsupported(FORMAT, format!("{other:?} samples (8-bit RGB or grey expected)")));
            }
        };
        if rgb.len() != dw as usize * dh as usize * 3 {
            return Err(ReadError::malformed(
                FORMAT,
                format!("tile ({tx}, {ty}) decoded to {} bytes for {dw} × {dh}", rgb.len()),
            ));
        }
        Ok(Tile { width: dw, height: dh, rgb })
    }

    fn read_raw(&mut self, offset: u64, count: u64) -> Result<Vec<u8>, ReadError> {
        if offset.checked_add(count).is_none_or(|end| end > self.file_len) {
            return Err(ReadError::malformed(
                FORMAT,
                format!("tile data at {offset} + {count} bytes runs past the end of the file ({})", self.file_len),
            ));
        }
        let r = self.decoder.inner();
        r.seek(SeekFrom::Start(offset)).map_err(|e| ReadError::malformed(FORMAT, format!("seek: {e}")))?;
        let mut raw = vec![0; count as usize];
        r.read_exact(&mut raw).map_err(|e| ReadError::malformed(FORMAT, format!("tile data: {e}")))?;
        Ok(raw)
    }
}

fn read_level<R: Read + Seek>(d: &mut Decoder<R>, ifd: usize, file_len: u64) -> Result<Level, ReadError> {
    let (width, height) = d.dimensions().map_err(tiff_error)?;
    let (tile_width, tile_height) = d.chunk_dimensions();
    if width == 0 || height == 0 || tile_width == 0 || tile_height == 0 {
        return Err(ReadError::malformed(
            FORMAT,
            format!("image {ifd}: {width} × {height} in {tile_width} × {tile_height} tiles"),
        ));
    }
    if tile_width as usize * tile_height as usize * 3 > TILE_BYTES_MAX {
        return Err(ReadError::TooLarge {
            what: format!("a {tile_width} × {tile_height} tile"),
            bytes: u64::from(tile_width) * u64::from(tile_height) * 3,
            limit_bytes: TILE_BYTES_MAX as u64,
        });
    }
    let (tiles_across, tiles_down) = (width.div_ceil(tile_width), height.div_ceil(tile_height));
    let tiles = u64::from(tiles_across) * u64::from(tiles_down);
    let compression = d.get_tag_u32(Tag::Compression).map_err(tiff_error)? as u16;
    let photometric = d.get_tag_u32(Tag::PhotometricInterpretation).map_err(tiff_error)? as u16;
    let tile_offsets = d.get_tag_u64_vec(Tag::TileOffsets).map_err(tiff_error)?;
    let tile_byte_counts = d.get_tag_u64_vec(Tag::TileByteCounts).map_err(tiff_error)?;
    // Chunky RGB has one tile per position; planar would have three.
    if tile_offsets.len() as u64 != tiles || tile_byte_counts.len() as u64 != tiles {
        return Err(ReadError::malformed(
            FORMAT,
            format!(
                "image {ifd}: {} tile offsets and {} byte counts for {tiles_across} × {tiles_down} tiles (planar images are not supported)",
                tile_offsets.len(),
                tile_byte_counts.len()
            ),
        ));
    }
    if let Some((i, (o, c))) = tile_offsets
        .iter()
        .zip(&tile_byte_counts)
        .enumerate()
        .find(|(_, (o, c))| o.checked_add(**c).is_none_or(|e| e > file_len))
    {
        return Err(ReadError::malformed(
            FORMAT,
            format!("image {ifd}: tile {i} at {o} + {c} bytes runs past the end ({file_len})"),
        ));
    }
    if let Some(c) = tile_byte_counts.iter().find(|&&c| c > TILE_COMPRESSED_BYTES_MAX) {
        return Err(ReadError::TooLarge {
            what: format!("a compressed tile of image {ifd}"),
            bytes: *c,
            limit_bytes: TILE_COMPRESSED_BYTES_MAX,
        });
    }
    let jpeg_tables = match compression {
        7 => match d.find_tag(Tag::JPEGTables).map_err(tiff_error)? {
            Some(v) => Some(v.into_u8_vec().map_err(tiff_error)?),
            None => None,
        },
        33003 | 33005 => {
            return Err(ReadError::unsupported(
                FORMAT,
                format!("image {ifd}: JPEG 2000 tiles (compression {compression})"),
            ));
        }
        _ => None,
    };
    Ok(Level {
        ifd,
        width,
        height,
        tile_width,
        tile_height,
        tiles_across,
        tiles_down,
        downsample: 1.0,
        compression,
        photometric,
        tile_offsets,
        tile_byte_counts,
        jpeg_tables,
    })
}

/// Decodes one JPEG tile to `tw × th` RGB8, splicing in the shared tables.
fn decode_jpeg_tile(tables: Option<&[u8]>, tile: &[u8], photometric: u16, tw: u32, th: u32) -> Result<Vec<u8>, String> {
    use zune_jpeg::zune_core::{bytestream::ZCursor, colorspace::ColorSpace, options::DecoderOptions};
    const SOI: [u8; 2] = [0xFF, 0xD8];
    const EOI: [u8; 2] = [0xFF, 0xD9];
    if tile.len() < 4 || tile[..2] != SOI {
        return Err("tile data does not start with a JPEG start-of-image marker".into());
    }
    let stream = match tables {
        Some(t) if t.len() >= 4 && t[..2] == SOI && t[t.len() - 2..] == EOI => [&t[..t.len() - 2], &tile[2..]].concat(),
        Some(t) if t.len() <= 4 => tile.to_vec(), // an empty table set
        Some(_) => return Err("JPEGTables is not a JPEG tables-only stream (SOI ... EOI)".into()),
        None => tile.to_vec(),
    };
    let options = DecoderOptions::default().set_max_width(tw as usize).set_max_height(th as usize);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(&stream[..]), options);
    dec.decode_headers().map_err(|e| format!("JPEG header: {e}"))?;
    let info = dec.info().ok_or("JPEG header without image information")?;
    if (u32::from(info.width), u32::from(info.height)) != (tw, th) {
        return Err(format!("JPEG of {} × {} in a {tw} × {th} tile", info.width, info.height));
    }
    let input = dec.input_colorspace().ok_or("JPEG without a colour space")?;
    let out = match (photometric, input) {
        // The components are R, G, B as stored: no transform.
        (2, ColorSpace::YCbCr | ColorSpace::RGB) => input,
        (6, ColorSpace::YCbCr) => ColorSpace::RGB,
        (1, ColorSpace::Luma) => ColorSpace::Luma,
        (p, c) => return Err(format!("photometric interpretation {p} with JPEG colour space {c:?}")),
    };
    dec.set_options(options.jpeg_set_out_colorspace(out));
    let pixels = dec.decode().map_err(|e| format!("JPEG data: {e}"))?;
    let rgb = if out == ColorSpace::Luma { pixels.iter().flat_map(|&g| [g, g, g]).collect() } else { pixels };
    if rgb.len() != tw as usize * th as usize * 3 {
        return Err(format!("JPEG decoded to {} bytes for a {tw} × {th} RGB tile", rgb.len()));
    }
    Ok(rgb)
}

/// The top-left `width × height` of a full `tw`-wide RGB tile.
fn crop(full: Vec<u8>, tw: u32, width: u32, height: u32) -> Tile {
    if width == tw && full.len() == (width * height * 3) as usize {
        return Tile { width, height, rgb: full };
    }
    let row = tw as usize * 3;
    let rgb = full.chunks_exact(row).take(height as usize).flat_map(|r| &r[..width as usize * 3]).copied().collect();
    Tile { width, height, rgb }
}

fn aperio_field(description: &str, key: &str) -> Option<f32> {
    description.split('|').find_map(|f| {
        let (k, v) = f.split_once('=')?;
        (k.trim() == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readers::test_support::{flips, testdata, truncations};

    const CMU: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/cmu_small_region.svs");

    #[test]
    fn cmu_svs_has_one_tiled_level_of_240_pixel_tiles() {
        let slide = Slide::open(CMU).unwrap();
        let levels = slide.levels();
        assert_eq!(levels.len(), 1, "{levels:?}");
        let l = &levels[0];
        assert_eq!((l.ifd, l.width, l.height, l.tile_width, l.tile_height), (0, 2220, 2967, 240, 240));
        assert_eq!((l.tiles_across, l.tiles_down, l.downsample), (10, 13, 1.0));
        assert!(slide.description.starts_with("Aperio Image Library"), "{}", slide.description);
        assert_eq!(slide.objective_magnification(), Some(20.0));
    }

    /// Reference tiles from tifffile + imagecodecs 2026.3.6 (libjpeg-turbo),
    /// decoding the same tile bytes with the same JPEGTables:
    /// `a[0, 0]`, `a[120, 120]` and the per-channel sums of the 240 × 240 tile.
    /// zune-jpeg and libjpeg-turbo round a few values differently (measured:
    /// sums differ by at most 196 over 57 600 pixels), so sums are compared
    /// within 0.02 per pixel on average and pixels within 1.
    type TileReference = ((u32, u32), [u8; 3], [u8; 3], [u64; 3]);
    const CMU_TILES: [TileReference; 3] = [
        ((0, 0), [221, 182, 221], [246, 246, 246], [13_910_128, 13_797_430, 13_851_916]),
        ((5, 6), [105, 78, 121], [243, 243, 243], [10_376_676, 9_425_101, 10_630_973]),
        ((3, 3), [246, 243, 243], [246, 243, 243], [13_471_760, 12_807_564, 13_150_739]),
    ];

    #[test]
    fn cmu_svs_jpeg_tiles_match_libjpeg_turbo() {
        let mut slide = Slide::open(CMU).unwrap();
        for ((tx, ty), first, centre, sums) in CMU_TILES {
            let t = slide.read_tile(0, tx, ty).unwrap();
            assert_eq!((t.width, t.height, t.rgb.len()), (240, 240, 240 * 240 * 3));
            let px = |x: usize, y: usize| -> [u8; 3] { t.rgb[(y * 240 + x) * 3..][..3].try_into().unwrap() };
            let near = |a: [u8; 3], b: [u8; 3]| a.iter().zip(b).all(|(&a, b)| a.abs_diff(b) <= 1);
            assert!(near(px(0, 0), first), "({tx}, {ty}) first pixel {:?} vs {first:?}", px(0, 0));
            assert!(near(px(120, 120), centre), "({tx}, {ty}) centre {:?} vs {centre:?}", px(120, 120));
            for (c, want) in sums.into_iter().enumerate() {
                let sum: u64 = t.rgb.iter().skip(c).step_by(3).map(|&v| u64::from(v)).sum();
                assert!(sum.abs_diff(want) < 240 * 240 / 50, "({tx}, {ty}) channel {c}: {sum} vs {want}");
            }
        }
    }

    #[test]
    fn edge_tiles_are_cropped_to_the_image() {
        let mut slide = Slide::open(CMU).unwrap();
        // 2220 = 9 × 240 + 60; 2967 = 12 × 240 + 87.
        let t = slide.read_tile(0, 9, 12).unwrap();
        assert_eq!((t.width, t.height, t.rgb.len()), (60, 87, 60 * 87 * 3));
        let err = slide.read_tile(0, 10, 0).unwrap_err().to_string();
        assert!(err.contains("no tile (10, 0)"), "{err}");
        let err = slide.read_tile(1, 0, 0).unwrap_err().to_string();
        assert!(err.contains("no level 1"), "{err}");
    }

    #[test]
    fn every_cmu_tile_decodes() {
        let mut slide = Slide::open(CMU).unwrap();
        let l = slide.levels()[0].clone();
        for ty in 0..l.tiles_down {
            for tx in 0..l.tiles_across {
                let t = slide.read_tile(0, tx, ty).unwrap();
                assert_eq!(t.rgb.len(), (t.width * t.height * 3) as usize);
            }
        }
    }

    #[test]
    fn truncated_or_corrupted_slides_give_errors_not_panics() {
        let bytes = testdata("cmu_small_region.svs");
        for (what, b) in truncations(&bytes) {
            // Opening fails when the cut takes directories or tile tables;
            // otherwise exactly the tiles whose bytes were cut must fail.
            let cut = b.len() as u64;
            match Slide::from_reader(std::io::Cursor::new(b)) {
                Err(e) => assert!(e.to_string().contains("TIFF"), "{what}: {e}"),
                Ok(mut s) => {
                    let l = s.levels()[0].clone();
                    for ty in 0..l.tiles_down {
                        for tx in 0..l.tiles_across {
                            let i = (ty * l.tiles_across + tx) as usize;
                            let whole = l.tile_offsets[i] + l.tile_byte_counts[i] <= cut;
                            assert_eq!(s.read_tile(0, tx, ty).is_ok(), whole, "{what}: tile ({tx}, {ty})");
                        }
                    }
                }
            }
        }
        for (what, b) in flips(&bytes, 120) {
            let r = std::panic::catch_unwind(|| {
                if let Ok(mut s) = Slide::from_reader(std::io::Cursor::new(b)) {
                    let l = s.levels()[0].clone();
                    for (tx, ty) in [(0, 0), (5, 6), (l.tiles_across - 1, l.tiles_down - 1)] {
                        let _ = s.read_tile(0, tx, ty);
                    }
                }
            });
            assert!(r.is_ok(), "{what}: panicked");
        }
    }

    /// A YCbCr JPEG tiled TIFF without shared tables (written by tifffile
    /// 2026.3.3 + imagecodecs from a synthetic 64 × 48 image, see
    /// testdata/PROVENANCE.md). Expected values from `tifffile.imread`:
    /// pixels (0, 0), (40, 20), (63, 47) and the per-channel sums.
    #[test]
    fn ycbcr_jpeg_tiles_are_converted_to_rgb() {
        let mut slide =
            Slide::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/tiled_ycbcr_jpeg_64x48.tif")).unwrap();
        let l = slide.levels()[0].clone();
        assert_eq!((l.width, l.height, l.tile_width, l.tile_height, l.photometric), (64, 48, 16, 16, 6));
        let mut image = vec![0u8; 64 * 48 * 3];
        for ty in 0..3 {
            for tx in 0..4 {
                let t = slide.read_tile(0, tx, ty).unwrap();
                for y in 0..16 {
                    let at = ((ty as usize * 16 + y) * 64 + tx as usize * 16) * 3;
                    image[at..at + 48].copy_from_slice(&t.rgb[y * 48..(y + 1) * 48]);
                }
            }
        }
        let px = |x: usize, y: usize| -> [u8; 3] { image[(y * 64 + x) * 3..][..3].try_into().unwrap() };
        assert_eq!((px(0, 0), px(40, 20), px(63, 47)), ([6, 9, 174], [172, 111, 129], [255, 247, 147]));
        for (c, want) in [387_259u64, 361_216, 395_913].into_iter().enumerate() {
            let sum: u64 = image.iter().skip(c).step_by(3).map(|&v| u64::from(v)).sum();
            // Chroma is subsampled 2 × 2 and the image is partly noise, so
            // zune-jpeg's and libjpeg-turbo's upsampling differ more here than on
            // the slide (measured: 899 over 3072 pixels in red, 0.3 per pixel).
            assert!(sum.abs_diff(want) < 64 * 48 / 2, "channel {c}: {sum} vs {want}");
        }
    }

    #[test]
    fn a_dicom_file_is_not_a_slide() {
        let err = Slide::from_reader(std::io::Cursor::new(testdata("CT_small.dcm"))).unwrap_err().to_string();
        assert!(err.starts_with("malformed TIFF slide"), "{err}");
    }
}
