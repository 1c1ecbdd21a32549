//! The privacy boundary for what is not DICOM (ADR 0005, issue #11): the free-text
//! clinical question, WFDB ECG headers and TIFF / Aperio SVS slides, cleaned at the
//! origin before the manifest is signed.
//!
//! - [`KnownIdentifiers`]: the patient's own direct identifiers as the clinician gave
//!   them (name, ID number, birth date, address, phone) and every common written
//!   form of them (name parts in either order, the ID and phone with or without
//!   separators, the birth date in ISO, compact, D/M/Y, M/D/Y, dotted, Chinese and
//!   month-name forms). [`KnownIdentifiers::redact`] replaces each occurrence in a
//!   text by `[removed]`; [`KnownIdentifiers::mask`] overwrites it with `X` of the
//!   same length (for values whose length must not change).
//! - [`scrub_wfdb_header`]: a WFDB `.hea` with its comment lines (age, sex,
//!   diagnoses, often names) and the record line's base time and date dropped, and
//!   known identifiers masked in what is left.
//! - [`scrub_tiff`]: a TIFF (SVS) rewritten in place, same length, pixel data
//!   untouched: the text tags that carry names and dates are blanked, Aperio's
//!   ImageDescription keeps only its technical fields, EXIF / GPS / XMP / IPTC
//!   metadata is zeroed and unlinked, and the SVS label and macro images (a photo of
//!   the slide label: names, barcodes) are zeroed and unlinked from the IFD chain.
//!
//! JPEG and PNG photos are cleaned by `scrub_photo.rs` (through [`clean_attachment`]).
//!
//! This module only finds and rewrites text it knows the shape of: it must never be
//! taken for a general PHI detector (a name the clinician did not give cannot be
//! found), never rewrite pixel data of the image itself, and never log an identifier.

use std::ops::Range;

/// What replaces an identifier in the clinical question.
pub const REDACTED: &str = "[removed]";
/// Longest text scrubbed (the clinical question, a WFDB header).
const TEXT_BYTES_MAX: usize = 1024 * 1024;
/// Most IFDs walked in one TIFF (a pyramid has a handful; a loop is refused).
const IFDS_MAX: usize = 64;
/// Most entries in one IFD.
const IFD_ENTRIES_MAX: u64 = 4096;
/// Shortest name part matched on its own ("Li" would also be a word in a text, but
/// a two-letter surname is a name; one letter is not).
const NAME_PART_CHARS_MIN: usize = 2;

/// Why a file could not be scrubbed (the case is then refused, never sent as is).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScrubError {
    #[error("not a TIFF file this node can clean: {0}")]
    Tiff(String),
    #[error("not a JPEG file this node can clean: {0}")]
    Jpeg(String),
    #[error("not a PNG file this node can clean: {0}")]
    Png(String),
    #[error("the WFDB header is not text: {0}")]
    Wfdb(String),
    #[error("{what} is {bytes} bytes, more than the {limit_bytes} this node cleans")]
    TooLarge { what: &'static str, bytes: usize, limit_bytes: usize },
}

/// A patient's own direct identifiers, in every form they are looked for.
#[derive(Debug, Clone, Default)]
pub struct KnownIdentifiers {
    /// Matched case-insensitively, letters and digits only at word boundaries.
    words: Vec<String>,
    /// Matched ignoring separators (space, '-', '.', '/', '(', ')', '+') between
    /// their characters: ID and phone numbers.
    numbers: Vec<String>,
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A birth date as year, month, day, read from the forms clinicians type.
fn parse_date(s: &str) -> Option<(u32, u32, u32)> {
    let digits: Vec<&str> = s.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty()).collect();
    let (y, m, d) = match digits.as_slice() {
        [one] if one.len() == 8 => (one[..4].parse().ok()?, one[4..6].parse().ok()?, one[6..].parse().ok()?),
        [a, b, c] if a.len() == 4 => (a.parse().ok()?, b.parse().ok()?, c.parse().ok()?),
        // D/M/Y is the reading outside the US; M/D/Y forms are generated below anyway.
        [a, b, c] if c.len() == 4 => (c.parse().ok()?, b.parse().ok()?, a.parse().ok()?),
        _ => return None,
    };
    ((1..=12).contains(&m) && (1..=31).contains(&d) && y >= 1000).then_some((y, m, d))
}

fn date_forms(y: u32, m: u32, d: u32) -> Vec<String> {
    let mut out = Vec::new();
    for (mm, dd) in [(format!("{m:02}"), format!("{d:02}")), (m.to_string(), d.to_string())] {
        for sep in ["-", "/", ".", " "] {
            out.push(format!("{y}{sep}{mm}{sep}{dd}"));
            out.push(format!("{dd}{sep}{mm}{sep}{y}"));
            out.push(format!("{mm}{sep}{dd}{sep}{y}"));
        }
        out.push(format!("{y}年{mm}月{dd}日"));
    }
    out.push(format!("{y}{m:02}{d:02}"));
    let month = MONTHS[(m - 1) as usize];
    for name in [month, &month[..3]] {
        out.push(format!("{d} {name} {y}"));
        out.push(format!("{d}-{name}-{y}"));
        out.push(format!("{d:02}-{name}-{y}"));
        out.push(format!("{name} {d}, {y}"));
        out.push(format!("{name} {d} {y}"));
    }
    out
}

impl KnownIdentifiers {
    /// The forms of the given identifiers (empty ones are skipped). `name` may be in
    /// DICOM form (`Family^Given`), "Given Family" or "Family, Given".
    pub fn new(name: &str, patient_id: &str, birth_date: &str, address: &str, phone: &str) -> KnownIdentifiers {
        let mut words = Vec::new();
        let name = name.trim();
        if !name.is_empty() {
            let parts: Vec<&str> = name
                .split(|c: char| c == '^' || c == ',' || c.is_whitespace())
                .filter(|p| p.chars().count() >= NAME_PART_CHARS_MIN)
                .collect();
            words.push(name.to_owned());
            words.push(parts.join(" "));
            let mut reversed = parts.clone();
            reversed.reverse();
            words.push(reversed.join(" "));
            words.extend(parts.iter().map(|p| p.to_string()));
            // A name with no separators (often Chinese): each part is the whole name.
        }
        let birth = birth_date.trim();
        if !birth.is_empty() {
            words.push(birth.to_owned());
            if let Some((y, m, d)) = parse_date(birth) {
                words.extend(date_forms(y, m, d));
            }
        }
        let address = address.trim();
        if !address.is_empty() {
            words.push(address.to_owned());
            // Address lines, as they are often written one per field.
            words.extend(address.split(',').map(str::trim).filter(|p| p.chars().count() > 3).map(str::to_owned));
        }
        let numbers = [patient_id, phone]
            .iter()
            .map(|n| n.chars().filter(|c| c.is_alphanumeric()).collect::<String>().to_lowercase())
            .filter(|n| n.chars().count() >= 4)
            .collect();
        words.retain(|w| !w.trim().is_empty());
        // Longest first, so "Zhang Wei" is one span, not two.
        words.sort_by_key(|w| std::cmp::Reverse(w.len()));
        words.dedup();
        KnownIdentifiers { words: words.into_iter().map(|w| w.to_lowercase()).collect(), numbers }
    }

    /// Whether there is nothing to look for.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty() && self.numbers.is_empty()
    }

    /// The byte ranges of `text` holding an identifier, sorted, not overlapping.
    pub fn find(&self, text: &str) -> Vec<Range<usize>> {
        let lower = text.to_lowercase();
        // Lower-casing may change byte lengths (rare scripts): then match on the text.
        let hay = if lower.len() == text.len() { lower.as_str() } else { text };
        let mut spans = Vec::new();
        for w in &self.words {
            let mut from = 0;
            while let Some(i) = hay[from..].find(w.as_str()) {
                let (s, e) = (from + i, from + i + w.len());
                if boundary_before(hay, s) && boundary_after(hay, e) {
                    spans.push(s..e);
                }
                from = s + w.len().max(1);
                while !hay.is_char_boundary(from) {
                    from += 1;
                }
            }
        }
        for n in &self.numbers {
            spans.extend(find_number(hay, n));
        }
        merge(spans)
    }

    /// `text` with each identifier replaced by [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for r in self.find(text) {
            out.push_str(&text[at..r.start]);
            out.push_str(REDACTED);
            at = r.end;
        }
        out.push_str(&text[at..]);
        out
    }

    /// `text` with each identifier overwritten by `X`, one per byte: the same length.
    pub fn mask(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for r in self.find(text) {
            out.push_str(&text[at..r.start]);
            out.extend(std::iter::repeat_n('X', r.len()));
            at = r.end;
        }
        out.push_str(&text[at..]);
        out
    }
}

/// Whether an identifier may start at byte `i` (not in the middle of a word or number).
/// CJK text has no spaces between words, so a CJK character counts as a boundary.
fn boundary_before(hay: &str, i: usize) -> bool {
    hay[..i].chars().next_back().is_none_or(|c| !c.is_alphanumeric() || is_cjk(c))
        || hay[i..].chars().next().is_some_and(is_cjk)
}

fn boundary_after(hay: &str, i: usize) -> bool {
    hay[i..].chars().next().is_none_or(|c| !c.is_alphanumeric() || is_cjk(c))
        || hay[..i].chars().next_back().is_some_and(is_cjk)
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF)
}

fn is_separator(c: char) -> bool {
    matches!(c, ' ' | '-' | '.' | '/' | '(' | ')' | '+' | '_')
}

/// The spans where `number`'s characters stand in order with only separators between.
fn find_number(hay: &str, number: &str) -> Vec<Range<usize>> {
    let want: Vec<char> = number.chars().collect();
    let chars: Vec<(usize, char)> = hay.char_indices().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].1 == want[0] && (i == 0 || !chars[i - 1].1.is_alphanumeric()) {
            let (mut j, mut k) = (i, 0);
            while j < chars.len() && k < want.len() {
                if chars[j].1 == want[k] {
                    k += 1;
                } else if !(is_separator(chars[j].1) && k > 0) {
                    break;
                }
                j += 1;
            }
            let end_ok = j >= chars.len() || !chars[j].1.is_alphanumeric();
            if k == want.len() && end_ok {
                let end = chars.get(j).map_or(hay.len(), |c| c.0);
                out.push(chars[i].0..end);
                i = j;
                continue;
            }
        }
        i += 1;
    }
    out
}

fn merge(mut spans: Vec<Range<usize>>) -> Vec<Range<usize>> {
    spans.sort_by_key(|r| (r.start, std::cmp::Reverse(r.end)));
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in spans {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The clinical question with the patient's known identifiers replaced.
pub fn scrub_question(question: &str, ids: &KnownIdentifiers) -> Result<String, ScrubError> {
    if question.len() > TEXT_BYTES_MAX {
        return Err(ScrubError::TooLarge {
            what: "the clinical question",
            bytes: question.len(),
            limit_bytes: TEXT_BYTES_MAX,
        });
    }
    Ok(ids.redact(question))
}

/// A WFDB header without what identifies the patient: every `#` comment (whole-line
/// or trailing; MIT-BIH puts age, sex and medication there, other sources names),
/// the record line's base time and base date (the time of the recording), and the
/// patient's known identifiers in what is left masked (a record or file named after
/// the patient). Record and signal lines keep their fields, so the record still reads.
pub fn scrub_wfdb_header(text: &[u8], ids: &KnownIdentifiers) -> Result<Vec<u8>, ScrubError> {
    if text.len() > TEXT_BYTES_MAX {
        return Err(ScrubError::TooLarge { what: "the WFDB header", bytes: text.len(), limit_bytes: TEXT_BYTES_MAX });
    }
    let text = std::str::from_utf8(text).map_err(|e| ScrubError::Wfdb(e.to_string()))?;
    let mut out = String::with_capacity(text.len());
    let mut record_line_seen = false;
    for raw in text.lines() {
        let line = raw.split('#').next().unwrap_or("").trim_end();
        if line.trim().is_empty() {
            continue;
        }
        let line = if record_line_seen {
            line.to_owned()
        } else {
            record_line_seen = true;
            // name nsig [freq [nsamp [base_time [base_date]]]]: keep the first four.
            line.split_whitespace().take(4).collect::<Vec<_>>().join(" ")
        };
        out.push_str(&ids.mask(&line));
        out.push('\n');
    }
    out.push_str("# de-identified at the origin: comments, base time and date removed\n");
    Ok(out.into_bytes())
}

/// Whether the first bytes of a file start a TIFF (classic or BigTIFF, either order).
pub fn is_tiff(head: &[u8]) -> bool {
    matches!(head.get(..4), Some(b"II*\0" | b"MM\0*" | b"II+\0" | b"MM\0+"))
}

/// What [`scrub_tiff`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TiffSummary {
    /// Text values blanked or reduced.
    pub texts_cleaned: usize,
    /// Metadata blocks (EXIF, GPS, XMP, IPTC, Photoshop) zeroed and unlinked.
    pub metadata_removed: usize,
    /// Associated images (SVS label, macro) zeroed and unlinked.
    pub images_removed: usize,
}

const TAG_NEW_SUBFILE_TYPE: u16 = 254;
const TAG_IMAGE_DESCRIPTION: u16 = 270;
const TAG_STRIP_OFFSETS: u16 = 273;
const TAG_STRIP_BYTE_COUNTS: u16 = 279;
const TAG_TILE_OFFSETS: u16 = 324;
const TAG_TILE_BYTE_COUNTS: u16 = 325;
/// ASCII tags that name people, places, documents or times; blanked.
const TEXT_TAGS_BLANKED: &[u16] = &[
    269,   // DocumentName
    285,   // PageName
    306,   // DateTime
    315,   // Artist
    316,   // HostComputer
    33432, // Copyright (may name the institution)
];
/// Tags whose whole value is metadata of its own: zeroed and their entry removed.
const METADATA_TAGS: &[u16] = &[
    700,   // XMP
    33723, // IPTC
    34377, // Photoshop
    34665, // EXIF IFD
    34853, // GPS IFD
    37724, // ImageSourceData
];
/// Aperio ImageDescription fields kept (technical; the rest — Filename, Date, Time,
/// User, ScanScope ID, ImageID, Barcode, Title, ... — is dropped).
const APERIO_FIELDS_KEPT: &[&str] = &[
    "AppMag",
    "MPP",
    "StripeWidth",
    "OriginalWidth",
    "OriginalHeight",
    "Originalheight",
    "Left",
    "Top",
    "LineCameraSkew",
    "LineAreaXOffset",
    "LineAreaYOffset",
    "Focus Offset",
    "Filmstrip",
    "Exposure Time",
    "Exposure Scale",
    "Gamma",
    "DisplayColor",
];

/// A TIFF's byte order and offset size, and the file's bytes.
struct Tiff<'a> {
    b: &'a mut [u8],
    little: bool,
    big: bool,
}

/// One IFD entry, decoded.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Where the entry starts in the file.
    at: usize,
    tag: u16,
    typ: u16,
    count: u64,
}

impl Tiff<'_> {
    fn err(why: impl Into<String>) -> ScrubError {
        ScrubError::Tiff(why.into())
    }

    fn read(&self, at: usize, n: usize) -> Result<u64, ScrubError> {
        let s = self.b.get(at..at.checked_add(n).ok_or_else(|| Self::err("offset overflow"))?);
        let s = s.ok_or_else(|| Self::err(format!("offset {at} past the end of the file")))?;
        let mut v = 0u64;
        for i in 0..n {
            let byte = if self.little { s[n - 1 - i] } else { s[i] };
            v = (v << 8) | byte as u64;
        }
        Ok(v)
    }

    fn write(&mut self, at: usize, n: usize, v: u64) {
        for i in 0..n {
            let shift = 8 * if self.little { i } else { n - 1 - i };
            self.b[at + i] = (v >> shift) as u8;
        }
    }

    fn offset_size(&self) -> usize {
        if self.big { 8 } else { 4 }
    }
    fn entry_size(&self) -> usize {
        if self.big { 20 } else { 12 }
    }
    fn count_size(&self) -> usize {
        if self.big { 8 } else { 2 }
    }

    fn first_ifd_pointer(&self) -> usize {
        if self.big { 8 } else { 4 }
    }

    fn entries(&self, ifd: usize) -> Result<Vec<Entry>, ScrubError> {
        let n = self.read(ifd, self.count_size())?;
        if n > IFD_ENTRIES_MAX {
            return Err(Self::err(format!("an IFD with {n} entries")));
        }
        (0..n as usize)
            .map(|k| {
                let at = ifd + self.count_size() + k * self.entry_size();
                let tag = self.read(at, 2)? as u16;
                let typ = self.read(at + 2, 2)? as u16;
                let count = self.read(at + 4, self.offset_size())?;
                Ok(Entry { at, tag, typ, count })
            })
            .collect()
    }

    fn next_pointer_at(&self, ifd: usize, n_entries: usize) -> usize {
        ifd + self.count_size() + n_entries * self.entry_size()
    }

    /// The byte range of an entry's value (inline in the entry, or at its offset).
    fn value_range(&self, e: &Entry) -> Result<Range<usize>, ScrubError> {
        let unit: u64 = match e.typ {
            1 | 2 | 6 | 7 => 1,
            3 | 8 => 2,
            4 | 9 | 11 | 13 => 4,
            5 | 10 | 12 | 16 | 17 | 18 => 8,
            t => return Err(Self::err(format!("tag {} has unknown type {t}", e.tag))),
        };
        let len = e.count.checked_mul(unit).ok_or_else(|| Self::err("value length overflow"))? as usize;
        let field = e.at + 4 + self.offset_size();
        if len <= self.offset_size() {
            return Ok(field..field + len);
        }
        let off = self.read(field, self.offset_size())? as usize;
        let end = off.checked_add(len).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| Self::err(format!("tag {} points past the end of the file", e.tag)))?;
        Ok(off..end)
    }

    /// The values of an integer array entry (offsets, byte counts).
    fn values(&self, e: &Entry) -> Result<Vec<u64>, ScrubError> {
        let r = self.value_range(e)?;
        let unit = match e.typ {
            3 => 2,
            4 | 13 => 4,
            16 | 18 => 8,
            t => return Err(Self::err(format!("tag {} is of type {t}, not an integer array", e.tag))),
        };
        (0..e.count as usize).map(|i| self.read(r.start + i * unit, unit)).collect()
    }

    fn zero(&mut self, r: Range<usize>) {
        self.b[r].fill(0);
    }

    /// Removes entry `k` of the IFD at `ifd` in place: later entries move up one
    /// slot, the count drops, the next-IFD pointer moves with them, the freed slot
    /// at the end is zeroed. Nothing else in the file moves.
    fn remove_entry(&mut self, ifd: usize, k: usize) -> Result<(), ScrubError> {
        let n = self.read(ifd, self.count_size())? as usize;
        let (es, start) = (self.entry_size(), ifd + self.count_size());
        let end = start + n * es + self.offset_size();
        self.b.copy_within(start + (k + 1) * es..end, start + k * es);
        self.zero(end - es..end);
        let cs = self.count_size();
        self.write(ifd, cs, (n - 1) as u64);
        Ok(())
    }
}

/// Rewrites the TIFF in `bytes` in place (same length) so it carries no identifying
/// text; see the module doc. The image's own pixel data is left byte for byte.
pub fn scrub_tiff(bytes: &mut [u8], ids: &KnownIdentifiers) -> Result<TiffSummary, ScrubError> {
    if !is_tiff(bytes) {
        return Err(Tiff::err("no TIFF header"));
    }
    let little = bytes[0] == b'I';
    let big = bytes[2] == 43 || bytes[3] == 43;
    let mut t = Tiff { b: bytes, little, big };
    let mut summary = TiffSummary::default();
    // The pointer to the current IFD (the header's, or the previous IFD's next field).
    let mut pointer_at = t.first_ifd_pointer();
    let mut seen = Vec::new();
    for _ in 0..IFDS_MAX {
        let ifd = t.read(pointer_at, t.offset_size())? as usize;
        if ifd == 0 {
            return Ok(summary);
        }
        if seen.contains(&ifd) {
            return Err(Tiff::err("the IFD chain loops"));
        }
        seen.push(ifd);
        let entries = t.entries(ifd)?;
        let next = t.read(t.next_pointer_at(ifd, entries.len()), t.offset_size())?;
        let description = match entries.iter().find(|e| e.tag == TAG_IMAGE_DESCRIPTION && e.typ == 2) {
            Some(e) => {
                let r = t.value_range(e)?;
                String::from_utf8_lossy(&t.b[r]).into_owned()
            }
            None => String::new(),
        };
        let subfile = entries.iter().find(|e| e.tag == TAG_NEW_SUBFILE_TYPE).map(|e| t.values(e)).transpose()?;
        let reduced = subfile.and_then(|v| v.first().copied()).unwrap_or(0) & 1 == 1;
        let first_line = description.lines().nth(1).unwrap_or("").trim_start().to_ascii_lowercase();
        if description.starts_with("Aperio") && (first_line.starts_with("label") || first_line.starts_with("macro"))
            || (!description.starts_with("Aperio") && reduced && description.to_ascii_lowercase().contains("label"))
        {
            // The slide label / macro photo: zero its pixels and every value it
            // holds, then unlink it (the previous pointer skips to the next IFD).
            for e in &entries {
                if matches!(e.tag, TAG_STRIP_OFFSETS | TAG_TILE_OFFSETS) {
                    let counts_tag =
                        if e.tag == TAG_STRIP_OFFSETS { TAG_STRIP_BYTE_COUNTS } else { TAG_TILE_BYTE_COUNTS };
                    let counts = entries
                        .iter()
                        .find(|c| c.tag == counts_tag)
                        .ok_or_else(|| Tiff::err("offsets without byte counts"))?;
                    let (offs, lens) = (t.values(e)?, t.values(counts)?);
                    for (o, l) in offs.iter().zip(&lens) {
                        let (o, l) = (*o as usize, *l as usize);
                        let end = o
                            .checked_add(l)
                            .filter(|&end| end <= t.b.len())
                            .ok_or_else(|| Tiff::err("a strip past the end of the file"))?;
                        t.zero(o..end);
                    }
                }
            }
            for e in &entries {
                let r = t.value_range(e)?;
                t.zero(r);
            }
            let os = t.offset_size();
            t.write(pointer_at, os, next);
            let table_end = t.next_pointer_at(ifd, entries.len()) + os;
            t.zero(ifd..table_end);
            summary.images_removed += 1;
            continue;
        }
        // Metadata blocks: zero what they hold, remove their entries (last first, so
        // the positions of the others stay valid).
        let mut removed_here = 0;
        for (k, e) in entries.iter().enumerate().rev() {
            if !METADATA_TAGS.contains(&e.tag) {
                continue;
            }
            let r = t.value_range(e)?;
            if matches!(e.tag, 34665 | 34853) {
                zero_sub_ifd(&mut t, &r)?;
            }
            t.zero(r);
            t.remove_entry(ifd, k)?;
            removed_here += 1;
        }
        summary.metadata_removed += removed_here;
        let entries = t.entries(ifd)?;
        for e in entries.iter().filter(|e| e.typ == 2) {
            let r = t.value_range(e)?;
            let old = String::from_utf8_lossy(&t.b[r.clone()]).into_owned();
            let new = if TEXT_TAGS_BLANKED.contains(&e.tag) {
                String::new()
            } else if e.tag == TAG_IMAGE_DESCRIPTION && old.starts_with("Aperio") {
                ids.mask(&aperio_description(&old))
            } else {
                ids.mask(&old)
            };
            if new != old {
                let mut value = new.into_bytes();
                value.truncate(r.len());
                value.resize(r.len(), 0);
                t.b[r].copy_from_slice(&value);
                summary.texts_cleaned += 1;
            }
        }
        pointer_at = t.next_pointer_at(ifd, entries.len());
    }
    Err(Tiff::err(format!("more than {IFDS_MAX} images")))
}

/// Zeroes the out-of-line values of the sub-IFD (EXIF, GPS) whose offset is at `r`.
fn zero_sub_ifd(t: &mut Tiff<'_>, r: &Range<usize>) -> Result<(), ScrubError> {
    let os = t.offset_size();
    if r.len() < os.min(4) {
        return Ok(());
    }
    let sub = t.read(r.start, r.len().min(os))? as usize;
    if sub == 0 || sub >= t.b.len() {
        return Ok(());
    }
    let entries = t.entries(sub)?;
    for e in &entries {
        if let Ok(v) = t.value_range(e) {
            t.zero(v);
        }
    }
    let end = (t.next_pointer_at(sub, entries.len()) + os).min(t.b.len());
    t.zero(sub..end);
    Ok(())
}

/// An Aperio ImageDescription with only its technical fields: the header text up to
/// the first `|` (library version, dimensions, compression), then the kept
/// `key = value` fields.
fn aperio_description(old: &str) -> String {
    let old = old.trim_end_matches('\0');
    let mut parts = old.split('|');
    let mut out = parts.next().unwrap_or("").to_owned();
    for p in parts {
        let key = p.split('=').next().unwrap_or("").trim();
        if APERIO_FIELDS_KEPT.contains(&key) {
            out.push('|');
            out.push_str(p);
        }
    }
    out
}

/// Largest TIFF cleaned (it is edited in memory); a larger slide is refused.
pub const TIFF_BYTES_MAX: u64 = 1024 * 1024 * 1024;
/// Method text recorded for a cleaned WFDB header.
pub const WFDB_METHOD: &str =
    "telemed-node WFDB header: comments, base time and date removed, known identifiers masked";
/// Method text recorded for a cleaned TIFF.
pub const TIFF_METHOD: &str = "telemed-node TIFF: text tags blanked or reduced, EXIF/GPS/XMP/IPTC and label/macro images removed, known identifiers masked; pixel data unchanged";
/// Method text recorded for a cleaned XML attachment (e.g. an XML ECG).
pub const XML_METHOD: &str = "telemed-node XML: known identifiers masked";

/// Writes the cleaned copy of the attachment `src` to `dst` and returns the method
/// text to record with the original's hash, or `None` when the file's kind carries
/// no text this node cleans (WFDB signal files, other binaries): it then travels as
/// it is. DICOM goes through [`crate::deid::Deidentifier`]; a file that cannot be
/// cleaned is an error (the case is refused, never sent with the file as it is).
pub fn clean_attachment(
    deid: &crate::deid::Deidentifier,
    burned_in: crate::deid::BurnedInPolicy,
    ids: &KnownIdentifiers,
    src: &std::path::Path,
    dst: &std::path::Path,
) -> Result<Option<String>, String> {
    use std::io::Read;
    let mut head = [0u8; 132];
    let n = std::fs::File::open(src).and_then(|mut f| f.read(&mut head)).map_err(|e| e.to_string())?;
    let head = &head[..n];
    let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let write = |bytes: &[u8]| std::fs::write(dst, bytes).map_err(|e| format!("cannot write the cleaned copy: {e}"));
    if crate::deid::is_dicom(head) {
        let summary = deid.deidentify_file_with(src, dst, burned_in).map_err(|e| e.to_string())?;
        Ok(Some(summary.method()))
    } else if is_tiff(head) {
        let len = std::fs::metadata(src).map_err(|e| e.to_string())?.len();
        if len > TIFF_BYTES_MAX {
            return Err(format!("a {len}-byte TIFF is larger than the {TIFF_BYTES_MAX} bytes this node de-identifies"));
        }
        let mut bytes = std::fs::read(src).map_err(|e| e.to_string())?;
        scrub_tiff(&mut bytes, ids).map_err(|e| e.to_string())?;
        write(&bytes)?;
        Ok(Some(TIFF_METHOD.to_owned()))
    } else if crate::scrub_photo::is_jpeg(head) || crate::scrub_photo::is_png(head) {
        // Photos: EXIF/GPS, XMP, IPTC, comments and PNG text removed (scrub_photo.rs).
        let len = std::fs::metadata(src).map_err(|e| e.to_string())?.len();
        if len > crate::scrub_photo::PHOTO_BYTES_MAX {
            let max = crate::scrub_photo::PHOTO_BYTES_MAX;
            return Err(format!("a {len}-byte photo is larger than the {max} bytes this node de-identifies"));
        }
        let bytes = std::fs::read(src).map_err(|e| e.to_string())?;
        let (clean, method) = if crate::scrub_photo::is_jpeg(head) {
            (crate::scrub_photo::scrub_jpeg(&bytes).map_err(|e| e.to_string())?.0, crate::scrub_photo::JPEG_METHOD)
        } else {
            (crate::scrub_photo::scrub_png(&bytes).map_err(|e| e.to_string())?.0, crate::scrub_photo::PNG_METHOD)
        };
        write(&clean)?;
        Ok(Some(method.to_owned()))
    } else if ext == "hea" {
        let len = std::fs::metadata(src).map_err(|e| e.to_string())?.len();
        if len > TEXT_BYTES_MAX as u64 {
            return Err(ScrubError::TooLarge {
                what: "the WFDB header",
                bytes: len as usize,
                limit_bytes: TEXT_BYTES_MAX,
            }
            .to_string());
        }
        let bytes = std::fs::read(src).map_err(|e| e.to_string())?;
        write(&scrub_wfdb_header(&bytes, ids).map_err(|e| e.to_string())?)?;
        Ok(Some(WFDB_METHOD.to_owned()))
    } else if ext == "xml" {
        let len = std::fs::metadata(src).map_err(|e| e.to_string())?.len();
        if len > 64 * TEXT_BYTES_MAX as u64 {
            return Err(format!("a {len}-byte XML attachment is larger than this node de-identifies"));
        }
        let bytes = std::fs::read(src).map_err(|e| e.to_string())?;
        let text = String::from_utf8(bytes).map_err(|_| "the XML attachment is not UTF-8 text".to_owned())?;
        write(ids.mask(&text).as_bytes())?;
        Ok(Some(XML_METHOD.to_owned()))
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zhang() -> KnownIdentifiers {
        KnownIdentifiers::new(
            "Zhang^Wei",
            "410102198001011234",
            "1980-01-01",
            "12 Jinshui Road, Zhengzhou",
            "+86 371 5555 0199",
        )
    }

    #[test]
    fn every_common_form_of_the_patients_identifiers_is_redacted_and_clinical_words_stay() {
        let ids = zhang();
        let q = "Wei Zhang (ZHANG^WEI), ID 410102 19800101 1234, born 01/01/1980 (1980年01月01日, Jan 1, 1980), \
                 lives at 12 Jinshui Road, tel. 86-371-5555-0199. Chest pain since 1980-01-02? Weight 70 kg.";
        let out = scrub_question(q, &ids).unwrap();
        for needle in
            ["Zhang", "ZHANG", "WEI", "410102", "1234", "19800101", "01/01/1980", "1980年", "Jan 1", "Jinshui", "5555"]
        {
            assert!(!out.contains(needle), "{needle} left in {out:?}");
        }
        for kept in ["Chest pain", "1980-01-02", "Weight 70 kg", "born", "ID"] {
            assert!(out.contains(kept), "{kept} lost from {out:?}");
        }
        // A name part inside another word is not a name ("Weight" keeps its "Wei").
        assert!(out.contains("Weight"));
        assert!(!out.split(|c: char| !c.is_alphanumeric()).any(|w| w.eq_ignore_ascii_case("wei")), "{out}");
    }

    #[test]
    fn mask_keeps_the_length_and_an_empty_identity_changes_nothing() {
        let ids = zhang();
        let s = "User = Zhang Wei|Date = 1/1/1980";
        let m = ids.mask(s);
        assert_eq!(m.len(), s.len());
        assert!(!m.contains("Zhang") && !m.contains("1980"), "{m}");
        let none = KnownIdentifiers::new("", "", "", "", "");
        assert!(none.is_empty());
        assert_eq!(none.redact(s), s);
    }

    #[test]
    fn a_wfdb_header_loses_comments_base_date_and_known_identifiers_and_still_parses() {
        let ids = zhang();
        let hea = b"zhang_wei 1 360 108000 10:15:00 01/01/1980\n\
                    zhang_wei.dat 212 200(1024)/mV 12 0 975 5363 0 MLII # Zhang Wei\n\
                    # 44 M Zhang Wei, DOB 1980-01-01, ID 410102198001011234\n\
                    # Medications: Digoxin\n";
        let out = scrub_wfdb_header(hea, &ids).unwrap();
        let text = String::from_utf8(out).unwrap();
        for needle in ["zhang", "Zhang", "1980", "410102", "Digoxin", "10:15:00", "44 M"] {
            assert!(!text.contains(needle), "{needle} left in {text:?}");
        }
        let parsed = crate::readers::wfdb::parse_wfdb_header(&text).unwrap();
        assert_eq!(parsed.sample_rate_hz, 360.0);
        assert_eq!(parsed.signals.len(), 1);
        assert_eq!(parsed.signals[0].description, "MLII");
    }

    #[test]
    fn an_svs_slide_loses_names_dates_and_its_label_image_and_keeps_its_tiles() {
        let ids = zhang();
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/cmu_small_region.svs");
        let mut bytes = std::fs::read(&src).unwrap();
        // The real slide's description names a user id, a file name and a date: put
        // the patient there instead (same length, as a scanner would have written it).
        let user = b"User = b414003d-95c6-48b0-9369-8010ed517ba7";
        let patient = b"User =Zhang Wei 410102198001011234 1/1/1980";
        assert_eq!(user.len(), patient.len());
        let mut n = 0;
        while let Some(i) = bytes.windows(user.len()).position(|w| w == user) {
            bytes[i..i + user.len()].copy_from_slice(patient);
            n += 1;
        }
        assert_eq!(n, 2, "both descriptions carry the field");
        let dir = tempfile::tempdir().unwrap();
        let identified = dir.path().join("identified.svs");
        std::fs::write(&identified, &bytes).unwrap();
        let before = crate::readers::slide::Slide::open(&identified).unwrap();
        let (levels, mpp, mag) =
            (before.levels().to_vec(), before.microns_per_pixel(), before.objective_magnification());

        let len = bytes.len();
        let summary = scrub_tiff(&mut bytes, &ids).unwrap();
        assert_eq!(bytes.len(), len, "rewritten in place");
        assert_eq!(summary.images_removed, 2, "label and macro: {summary:?}");
        for needle in ["Zhang", "410102198001011234", "1980", "CMU-1", "12/29/09", "Filename", "label 387x463"] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} left in the slide");
        }
        let cleaned = dir.path().join("cleaned.svs");
        std::fs::write(&cleaned, &bytes).unwrap();
        let mut after = crate::readers::slide::Slide::open(&cleaned).unwrap();
        assert_eq!(after.levels(), levels.as_slice(), "the pyramid (and its tile offsets) unchanged");
        assert_eq!((after.microns_per_pixel(), after.objective_magnification()), (mpp, mag), "MPP and AppMag kept");
        let mut before = crate::readers::slide::Slide::open(&identified).unwrap();
        assert_eq!(after.read_tile(0, 0, 0).unwrap(), before.read_tile(0, 0, 0).unwrap(), "pixels unchanged");
        // Every tile and strip of the images kept is the same, byte for byte.
        let mut original = std::fs::read(&identified).unwrap();
        let t = Tiff { b: &mut original, little: true, big: false };
        let (mut ifd, mut kept_bytes) = (t.read(4, 4).unwrap() as usize, 0);
        for _ in 0..2 {
            let entries = t.entries(ifd).unwrap();
            let get = |tag| entries.iter().find(|e| e.tag == tag).map(|e| t.values(e).unwrap());
            let (offs, lens) = match get(TAG_TILE_OFFSETS) {
                Some(o) => (o, get(TAG_TILE_BYTE_COUNTS).unwrap()),
                None => (get(TAG_STRIP_OFFSETS).unwrap(), get(TAG_STRIP_BYTE_COUNTS).unwrap()),
            };
            for (o, l) in offs.iter().zip(&lens) {
                let r = *o as usize..(*o + *l) as usize;
                assert_eq!(t.b[r.clone()], bytes[r.clone()], "pixel data at {r:?}");
                kept_bytes += r.len();
            }
            ifd = t.read(t.next_pointer_at(ifd, entries.len()), 4).unwrap() as usize;
        }
        assert!(kept_bytes > 1_000_000, "{kept_bytes}");
    }

    #[test]
    fn a_truncated_or_looping_tiff_is_refused() {
        let ids = zhang();
        let mut b =
            std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/cmu_small_region.svs"))
                .unwrap();
        // The first IFD pointer aimed at itself's header: a loop via next pointer.
        let mut looped = b.clone();
        let first = u32::from_le_bytes(looped[4..8].try_into().unwrap()) as usize;
        let n = u16::from_le_bytes(looped[first..first + 2].try_into().unwrap()) as usize;
        let next_at = first + 2 + 12 * n;
        looped[next_at..next_at + 4].copy_from_slice(&(first as u32).to_le_bytes());
        assert!(matches!(scrub_tiff(&mut looped, &ids), Err(ScrubError::Tiff(why)) if why.contains("loops")));
        b.truncate(first + 10);
        assert!(matches!(scrub_tiff(&mut b, &ids), Err(ScrubError::Tiff(_))));
        assert!(matches!(scrub_tiff(&mut b"not a tiff".to_vec(), &ids), Err(ScrubError::Tiff(_))));
    }
}
