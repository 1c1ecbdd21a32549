//! The 12-lead ECG as an SVG on standard paper, rendered on the server.
//!
//! Standard paper: 25 mm/s, 10 mm/mV, a 1 mm minor and 5 mm major grid, a 1 mV ×
//! 200 ms calibration pulse at the start of every row, and the usual layout: three
//! rows of four 2.5 s columns (I, II, III | aVR, aVL, aVF | V1–V3 | V4–V6) and a 10 s
//! lead II rhythm strip. The SVG's user unit is one millimetre of paper. Traces are
//! decimated by min/max per 0.25 mm so peaks survive. This module must never read
//! files or trust a lead name into markup unescaped: it only draws samples it is given.

use std::fmt::Write;

/// Paper speed.
pub const MM_PER_S: f64 = 25.0;
/// Gain.
pub const MM_PER_MV: f64 = 10.0;
/// Seconds of signal per column of the 3×4 layout.
const COLUMN_S: f64 = 2.5;
/// Height of one row, mm.
const ROW_MM: f64 = 30.0;
/// Room at the left of each row for the calibration pulse, mm.
const CAL_MM: f64 = 10.0;
/// Samples beyond this many millivolts are clipped (keeps rows apart).
const CLIP_MV: f64 = 2.5;
/// Width of one decimation bucket, mm.
const BUCKET_MM: f64 = 0.25;
/// Longest signal drawn, seconds (the rhythm strip).
const STRIP_S: f64 = 10.0;

/// The 3×4 layout, row by row.
pub const LAYOUT: [[&str; 4]; 3] = [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]];
/// The rhythm strip's lead.
pub const RHYTHM_LEAD: &str = "II";

/// Normalises a lead name as devices write it ("Lead I (Einthoven)", "AVR", "v1").
pub fn canonical_lead(name: &str) -> Option<&'static str> {
    let n = name.trim();
    let n = n.strip_prefix("Lead ").or_else(|| n.strip_prefix("lead ")).unwrap_or(n);
    let n = n.split([' ', '(']).next().unwrap_or("");
    LAYOUT.iter().flatten().copied().find(|l| l.eq_ignore_ascii_case(n))
}

/// Draws `leads` (name, millivolts at `sample_rate_hz`) as standard 12-lead paper.
/// Leads missing from the recording leave their cell empty but labelled.
pub fn render(sample_rate_hz: f64, leads: &[(&str, &[f32])], title: &str) -> String {
    let find = |want: &str| leads.iter().find(|(n, _)| canonical_lead(n) == Some(want)).map(|(_, s)| *s);
    let width = CAL_MM + STRIP_S * MM_PER_S + 2.0;
    let height = ROW_MM * 4.0 + 8.0;
    let mut svg = String::with_capacity(64 * 1024);
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="ecg" viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="12-lead ECG">"#
    );
    svg.push_str(
        r##"<defs><pattern id="ecg-minor" width="1" height="1" patternUnits="userSpaceOnUse"><path d="M1 0H0V1" fill="none" stroke="#f4b6b6" stroke-width="0.05"/></pattern><pattern id="ecg-major" width="5" height="5" patternUnits="userSpaceOnUse"><path d="M5 0H0V5" fill="none" stroke="#e07a7a" stroke-width="0.15"/></pattern></defs>"##,
    );
    let _ = write!(
        svg,
        r##"<rect class="ecg-paper" width="{width}" height="{height}" fill="#fff8f8"/><rect class="ecg-grid-minor" width="{width}" height="{height}" fill="url(#ecg-minor)"/><rect class="ecg-grid-major" width="{width}" height="{height}" fill="url(#ecg-major)"/>"##
    );
    let _ = write!(
        svg,
        r#"<text class="ecg-scale" x="{}" y="{}" font-size="3">{} · 25 mm/s · 10 mm/mV · {} Hz</text>"#,
        CAL_MM,
        height - 2.0,
        escape(title),
        sample_rate_hz.round()
    );
    for (row, names) in LAYOUT.iter().enumerate() {
        let baseline = ROW_MM * (row as f64 + 0.5) + 2.0;
        calibration(&mut svg, baseline);
        for (col, name) in names.iter().enumerate() {
            let x0 = CAL_MM + col as f64 * COLUMN_S * MM_PER_S;
            let from_s = col as f64 * COLUMN_S;
            if let Some(samples) = find(name) {
                trace(&mut svg, samples, sample_rate_hz, from_s, COLUMN_S, x0, baseline);
            }
            if col > 0 {
                let _ = write!(
                    svg,
                    r##"<path class="ecg-sep" d="M{x0:.2} {:.2}v6" stroke="#000" stroke-width="0.3"/>"##,
                    baseline - 3.0
                );
            }
            label(&mut svg, name, x0 + 1.0, baseline - ROW_MM / 2.0 + 5.0);
        }
    }
    let baseline = ROW_MM * 3.5 + 2.0;
    calibration(&mut svg, baseline);
    if let Some(samples) = find(RHYTHM_LEAD) {
        trace(&mut svg, samples, sample_rate_hz, 0.0, STRIP_S, CAL_MM, baseline);
    }
    label(&mut svg, RHYTHM_LEAD, CAL_MM + 1.0, baseline - ROW_MM / 2.0 + 5.0);
    svg.push_str("</svg>");
    svg
}

fn label(svg: &mut String, name: &str, x: f64, y: f64) {
    let _ = write!(
        svg,
        r#"<text class="ecg-lead" x="{x:.2}" y="{y:.2}" font-size="3.5" font-weight="bold">{}</text>"#,
        escape(name)
    );
}

/// The 1 mV, 200 ms calibration pulse at the left of a row.
fn calibration(svg: &mut String, baseline: f64) {
    let _ = write!(
        svg,
        r##"<path class="ecg-cal" d="M1 {baseline:.2}h2v-{:.2}h{:.2}v{:.2}h2" fill="none" stroke="#000" stroke-width="0.3"/>"##,
        MM_PER_MV,
        0.2 * MM_PER_S,
        MM_PER_MV
    );
}

/// One trace: `seconds` of `samples` from `from_s`, drawn from `x0` on `baseline`.
fn trace(svg: &mut String, samples: &[f32], rate: f64, from_s: f64, seconds: f64, x0: f64, baseline: f64) {
    if !(rate.is_finite() && rate > 0.0) {
        return;
    }
    let first = (from_s * rate) as usize;
    let last = (((from_s + seconds) * rate) as usize).min(samples.len());
    if first >= last {
        return;
    }
    let per_bucket = ((BUCKET_MM / MM_PER_S) * rate).max(1.0);
    let y = |mv: f32| {
        let mv = if mv.is_finite() { f64::from(mv).clamp(-CLIP_MV, CLIP_MV) } else { 0.0 };
        baseline - mv * MM_PER_MV
    };
    svg.push_str(r##"<polyline class="ecg-trace" fill="none" stroke="#000" stroke-width="0.25" stroke-linejoin="round" points=""##);
    let mut i = first as f64;
    while (i as usize) < last {
        let a = i as usize;
        let b = ((i + per_bucket) as usize).clamp(a + 1, last);
        let bucket = &samples[a..b];
        let (mut lo, mut hi) = (0usize, 0usize);
        for (k, v) in bucket.iter().enumerate() {
            if *v < bucket[lo] {
                lo = k;
            }
            if *v > bucket[hi] {
                hi = k;
            }
        }
        let x = x0 + (a as f64 / rate - from_s) * MM_PER_S;
        // Min and max in time order, so the shape is kept.
        let (p, q) = if lo <= hi { (lo, hi) } else { (hi, lo) };
        let _ = write!(svg, "{x:.2},{:.2} {x:.2},{:.2} ", y(bucket[p]), y(bucket[q]));
        i += per_bucket;
    }
    svg.push_str(r##""/>"##);
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: f64, seconds: f64) -> Vec<f32> {
        (0..(rate * seconds) as usize).map(|i| (i as f64 / rate * 6.0).sin() as f32).collect()
    }

    #[test]
    fn twelve_leads_are_labelled_and_drawn_with_a_rhythm_strip() {
        let s = sine(500.0, 10.0);
        let names = ["Lead I", "II", "III", "aVR", "AVL", "aVF", "V1", "V2", "V3", "V4", "V5", "v6"];
        let leads: Vec<(&str, &[f32])> = names.iter().map(|n| (*n, s.as_slice())).collect();
        let svg = render(500.0, &leads, "test");
        assert_eq!(svg.matches(r#"class="ecg-lead""#).count(), 13, "12 labels and the strip's");
        assert_eq!(svg.matches(r#"class="ecg-trace""#).count(), 13, "12 traces and the strip");
        assert_eq!(svg.matches(r#"class="ecg-cal""#).count(), 4, "a calibration pulse per row");
        assert!(svg.contains(r#"<pattern id="ecg-minor" width="1""#) && svg.contains(r#"id="ecg-major" width="5""#));
        // The calibration pulse is 10 mm tall (1 mV) and 5 mm wide (200 ms).
        assert!(svg.contains("h2v-10.00h5.00v10.00h2"), "{}", &svg[..600]);
    }

    #[test]
    fn one_millivolt_is_ten_millimetres_and_one_second_twenty_five() {
        // A 1 mV step at t = 1 s in lead II: the strip draws it 25 mm right of its start, 10 mm up.
        let rate = 100.0;
        let s: Vec<f32> = (0..1000).map(|i| if i >= 100 { 1.0 } else { 0.0 }).collect();
        let svg = render(rate, &[("II", &s)], "step");
        let baseline = ROW_MM * 3.5 + 2.0;
        let at = format!("{:.2},{:.2}", CAL_MM + 25.0, baseline - 10.0);
        assert!(svg.contains(&at), "expected point {at}");
    }

    #[test]
    fn lead_names_and_titles_are_escaped_and_nan_is_drawn_flat() {
        let s = vec![f32::NAN; 100];
        let svg = render(100.0, &[("II", &s)], "<script>alert(1)</script>");
        assert!(!svg.contains("<script>"));
        assert!(!svg.contains("NaN"));
        assert_eq!(canonical_lead("Lead aVR (Goldberger)"), Some("aVR"));
        assert_eq!(canonical_lead("X"), None);
    }
}
