//! The admin's report: one self-contained HTML file (inline SVG charts drawn with
//! plotters, inline CSS, no scripts, nothing fetched from a CDN) for one run, and a
//! side-by-side page comparing two runs.
//!
//! This module must never compute figures of its own from cases: it only draws what
//! [`Metrics`] holds, so the HTML, CSV and JSON always agree.

use crate::metrics::Metrics;
use plotters::prelude::*;
use std::collections::BTreeSet;
use std::fmt::Write as _;

const W: u32 = 900;
const H: u32 = 340;
const TIERS: [&str; 7] = ["village", "township", "county", "city", "provincial", "national", "international"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn colour(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

/// A line chart of several series over x.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let x_max = series.iter().flat_map(|s| s.1.iter().map(|p| p.0)).fold(1e-9, f64::max);
        let y_max = series.iter().flat_map(|s| s.1.iter().map(|p| p.1)).fold(1e-9, f64::max) * 1.1;
        let chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max);
        let Ok(mut chart) = chart else { return svg_error(title) };
        let _ = chart.configure_mesh().x_desc(x_label).y_desc(y_label).light_line_style(WHITE).draw();
        for (i, (name, points)) in series.iter().enumerate() {
            let c = colour(i);
            if let Ok(a) = chart.draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2))) {
                a.label(name.clone()).legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
            }
        }
        let _ = chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .position(SeriesLabelPosition::UpperRight)
            .draw();
        let _ = root.present();
    }
    svg
}

/// Grouped bars: one group per category, one bar per series.
pub fn bar_chart(title: &str, y_label: &str, categories: &[String], series: &[(String, Vec<f64>)]) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H + 40)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let y_max = series.iter().flat_map(|s| s.1.iter().copied()).fold(1e-9, f64::max) * 1.15;
        let n = categories.len().max(1);
        let chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..n as f64, 0f64..y_max);
        let Ok(mut chart) = chart else { return svg_error(title) };
        let cats = categories.to_vec();
        let _ = chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 {
                    cats.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_label_style(("sans-serif", 10))
            .y_desc(y_label)
            .draw();
        let k = series.len().max(1) as f64;
        for (j, (name, values)) in series.iter().enumerate() {
            let c = colour(j);
            let bars = values.iter().enumerate().map(move |(i, v)| {
                let x0 = i as f64 + 0.1 + 0.8 * j as f64 / k;
                let x1 = x0 + 0.8 / k;
                Rectangle::new([(x0, 0.0), (x1, *v)], c.filled())
            });
            if let Ok(a) = chart.draw_series(bars) {
                a.label(name.clone()).legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
            }
        }
        let _ = chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .position(SeriesLabelPosition::UpperRight)
            .draw();
        let _ = root.present();
    }
    svg
}

fn svg_error(title: &str) -> String {
    format!("<p>chart {} could not be drawn</p>", esc(title))
}

fn mu_labels(m: &Metrics) -> Vec<String> {
    m.turnaround.iter().map(|r| format!("{}/{}", r.modality, r.urgency)).collect()
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}\
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}.bad{background:#fdd;padding:1em;border:2px solid #c00}\
.ok{background:#dfd;padding:.5em 1em}.pair{display:flex;gap:1em;flex-wrap:wrap}svg{max-width:100%;height:auto}";

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table><tr>");
    for h in head {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{}</td>", esc(c));
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    s
}

fn summary_rows(m: &Metrics) -> Vec<Vec<String>> {
    vec![
        vec!["scenario".into(), m.scenario.clone()],
        vec!["seed".into(), m.seed.to_string()],
        vec!["trace hash (SHA-256)".into(), m.trace_hash.clone()],
        vec!["nodes".into(), m.nodes_total.to_string()],
        vec!["cores instantiated".into(), m.cores_created.to_string()],
        vec!["cases submitted".into(), m.cases_submitted.to_string()],
        vec!["cases reported at origin".into(), m.cases_reported_at_origin.to_string()],
        vec!["escalations (reroutes)".into(), format!("{} ({})", m.escalations, m.reroutes)],
        vec!["messages delivered".into(), m.messages_delivered.to_string()],
        vec!["events".into(), m.events_processed.to_string()],
        vec!["simulated hours (arrivals)".into(), format!("{:.1} ({:.1})", m.simulated_h, m.arrivals_h)],
        vec!["wall time".into(), format!("{:.2} s", m.wall_s)],
        vec![
            "cases / wall s; events / wall s".into(),
            format!("{:.0}; {:.0}", m.cases_per_wall_s, m.events_per_wall_s),
        ],
    ]
}

fn violations_html(m: &Metrics) -> String {
    if m.violations.is_empty() {
        return "<p class=ok>All invariants held: no case lost, none read twice, every report reached its origin.</p>"
            .into();
    }
    let mut s = String::from("<div class=bad><b>INVARIANTS BROKEN — do not trust this run.</b><ul>");
    for v in &m.violations {
        let _ = write!(s, "<li>{}</li>", esc(v));
    }
    s.push_str("</ul></div>");
    s
}

/// The report for one run.
pub fn run_html(m: &Metrics) -> String {
    let mut s = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>telemed-sim: {}</title><style>{STYLE}</style></head><body>",
        esc(&m.scenario)
    );
    let _ = write!(s, "<h1>Simulation report: {}</h1><p>{}</p>", esc(&m.scenario), esc(&m.description));
    s.push_str(&violations_html(m));
    s.push_str(&table(&["figure", "value"], &summary_rows(m)));

    // Turnaround and deadlines.
    s.push_str("<h2>Turnaround by modality × urgency</h2>");
    let cats = mu_labels(m);
    let pct = |f: fn(&crate::metrics::TurnaroundRow) -> f64| m.turnaround.iter().map(f).collect::<Vec<f64>>();
    let of_deadline = |f: fn(&crate::metrics::TurnaroundRow) -> f64| {
        m.turnaround.iter().map(|r| 100.0 * f(r) / r.deadline_min.max(1e-9)).collect::<Vec<f64>>()
    };
    s.push_str(&bar_chart(
        "Turnaround to report at origin, as % of the deadline (100 % = on the deadline)",
        "% of deadline",
        &cats,
        &[
            ("p50".into(), of_deadline(|r| r.p50_min)),
            ("p90".into(), of_deadline(|r| r.p90_min)),
            ("p99".into(), of_deadline(|r| r.p99_min)),
        ],
    ));
    let rows: Vec<Vec<String>> = m
        .turnaround
        .iter()
        .map(|r| {
            vec![
                format!("{} {}", r.modality, r.urgency),
                r.cases.to_string(),
                format!("{:.0}", r.deadline_min),
                format!("{:.1}", r.mean_min),
                format!("{:.1}", r.p50_min),
                format!("{:.1}", r.p90_min),
                format!("{:.1}", r.p95_min),
                format!("{:.1}", r.p99_min),
                format!("{:.1}", r.max_min),
                r.deadline_missed.to_string(),
                format!("{:.1} %", r.deadline_missed_pct),
            ]
        })
        .collect();
    s.push_str(&table(
        &["case kind", "cases", "deadline min", "mean", "p50", "p90", "p95", "p99", "max", "missed", "missed %"],
        &rows,
    ));
    s.push_str("<h2>Deadline misses</h2>");
    s.push_str(&bar_chart(
        "Cases reported after their deadline (%)",
        "% of cases",
        &cats,
        &[("missed %".into(), pct(|r| r.deadline_missed_pct))],
    ));

    // Where cases were resolved, and load per tier.
    s.push_str("<h2>Where cases were resolved</h2>");
    let tiers: Vec<String> = TIERS
        .iter()
        .filter(|t| m.nodes_by_tier.iter().any(|c| c.tier == **t && c.nodes > 0))
        .map(|t| t.to_string())
        .collect();
    let modalities = ["ecg", "imaging", "pathology"];
    let mut series = Vec::new();
    for md in modalities {
        for (kind, model) in [("model", true), ("expert", false)] {
            let v: Vec<f64> = tiers
                .iter()
                .map(|t| {
                    m.resolved
                        .iter()
                        .filter(|r| r.tier == *t && r.modality == md)
                        .map(|r| if model { r.by_model } else { r.by_expert } as f64)
                        .sum()
                })
                .collect();
            if v.iter().any(|x| *x > 0.0) {
                series.push((format!("{md} by {kind}"), v));
            }
        }
    }
    s.push_str(&bar_chart("Cases read, by tier of the reader", "cases", &tiers, &series));
    let load_series: Vec<(String, Vec<f64>)> =
        modalities.iter().map(|md| (md.to_string(), tiers.iter().map(|t| m.load_at(t, md) as f64).collect())).collect();
    s.push_str(&bar_chart("Cases arriving at each tier (custody taken), by modality", "cases", &tiers, &load_series));

    // Utilisation and queues.
    s.push_str("<h2>Expert utilisation per tier</h2>");
    let util_tiers: BTreeSet<&str> = m.utilisation.iter().map(|r| r.tier.as_str()).collect();
    let series: Vec<(String, Vec<(f64, f64)>)> = TIERS
        .iter()
        .filter(|t| util_tiers.contains(*t))
        .map(|t| {
            let pts = m.utilisation.iter().filter(|r| r.tier == *t).map(|r| (f64::from(r.hour), r.utilisation * 100.0));
            (t.to_string(), pts.collect())
        })
        .collect();
    s.push_str(&line_chart("Busy share of on-duty expert time (%), hourly", "hour", "%", &series));
    let rows: Vec<Vec<String>> = TIERS
        .iter()
        .filter(|t| util_tiers.contains(*t))
        .map(|t| {
            let (b, d) = m
                .utilisation
                .iter()
                .filter(|r| r.tier == *t)
                .fold((0.0, 0.0), |(b, d), r| (b + r.busy_expert_h, d + r.on_duty_expert_h));
            vec![
                t.to_string(),
                format!("{b:.1}"),
                format!("{d:.1}"),
                format!("{:.1} %", if d > 0.0 { 100.0 * b / d } else { 0.0 }),
            ]
        })
        .collect();
    s.push_str(&table(&["tier", "busy expert-h", "on-duty expert-h", "utilisation"], &rows));
    s.push_str("<h2>Consult queue length over time</h2>");
    let series: Vec<(String, Vec<(f64, f64)>)> = TIERS
        .iter()
        .filter(|t| m.queue.iter().any(|q| q.tier == **t && q.waiting > 0))
        .map(|t| (t.to_string(), m.queue.iter().filter(|q| q.tier == *t).map(|q| (q.t_h, q.waiting as f64)).collect()))
        .collect();
    s.push_str(&line_chart("Cases waiting for an expert, summed per tier", "hour", "cases", &series));

    // Links.
    s.push_str("<h2>Link load</h2>");
    let series: Vec<(String, Vec<(f64, f64)>)> = TIERS
        .iter()
        .take(6)
        .filter(|t| m.link_load.iter().any(|r| r.link == **t && r.bytes > 0))
        .map(|t| {
            (
                format!("{t} uplinks"),
                m.link_load.iter().filter(|r| r.link == *t).map(|r| (f64::from(r.hour), r.mbit_s)).collect(),
            )
        })
        .collect();
    s.push_str(&line_chart("Traffic summed over all links of a kind (Mbit/s, hourly mean)", "hour", "Mbit/s", &series));
    s.push_str("<p>Links are named by their lower end: <i>village uplinks</i> are every village–township link.</p>");
    s.push_str("</body></html>\n");
    s
}

/// Two runs side by side.
pub fn compare_html(a: &Metrics, b: &Metrics) -> String {
    let name = |m: &Metrics| format!("{} (seed {})", m.scenario, m.seed);
    let (na, nb) = (name(a), name(b));
    let mut s = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>telemed-sim compare</title><style>{STYLE}</style></head><body><h1>{} vs {}</h1>",
        esc(&na),
        esc(&nb)
    );
    s.push_str("<div class=pair><div>");
    s.push_str(&violations_html(a));
    s.push_str(&table(&["A", ""], &summary_rows(a)));
    s.push_str("</div><div>");
    s.push_str(&violations_html(b));
    s.push_str(&table(&["B", ""], &summary_rows(b)));
    s.push_str("</div></div>");
    let cats: Vec<String> = mu_labels(a).into_iter().chain(mu_labels(b)).collect::<BTreeSet<_>>().into_iter().collect();
    let get = |m: &Metrics, f: fn(&crate::metrics::TurnaroundRow) -> f64| -> Vec<f64> {
        cats.iter()
            .map(|c| m.turnaround.iter().find(|r| format!("{}/{}", r.modality, r.urgency) == *c).map_or(0.0, f))
            .collect()
    };
    s.push_str("<h2>Turnaround p90 (minutes)</h2>");
    s.push_str(&bar_chart(
        "p90 turnaround",
        "minutes",
        &cats,
        &[(na.clone(), get(a, |r| r.p90_min)), (nb.clone(), get(b, |r| r.p90_min))],
    ));
    s.push_str("<h2>Deadline misses (%)</h2>");
    s.push_str(&bar_chart(
        "missed %",
        "%",
        &cats,
        &[(na.clone(), get(a, |r| r.deadline_missed_pct)), (nb.clone(), get(b, |r| r.deadline_missed_pct))],
    ));
    let tiers: Vec<String> = TIERS.iter().map(|t| t.to_string()).collect();
    for md in ["ecg", "imaging", "pathology"] {
        let la: Vec<f64> = tiers.iter().map(|t| a.load_at(t, md) as f64).collect();
        let lb: Vec<f64> = tiers.iter().map(|t| b.load_at(t, md) as f64).collect();
        let _ = write!(s, "<h2>{md} cases arriving per tier</h2>");
        s.push_str(&bar_chart(
            &format!("{md} load by tier"),
            "cases",
            &tiers,
            &[(na.clone(), la.clone()), (nb.clone(), lb.clone())],
        ));
        let rows: Vec<Vec<String>> = tiers
            .iter()
            .zip(la.iter().zip(&lb))
            .filter(|(_, (x, y))| **x > 0.0 || **y > 0.0)
            .map(|(t, (x, y))| {
                let change = if *x > 0.0 { format!("{:+.1} %", 100.0 * (y - x) / x) } else { "—".into() };
                vec![t.clone(), format!("{x:.0}"), format!("{y:.0}"), change]
            })
            .collect();
        s.push_str(&table(&["tier", "A", "B", "B vs A"], &rows));
    }
    let rows: Vec<Vec<String>> = cats
        .iter()
        .zip(get(a, |r| r.p90_min).into_iter().zip(get(b, |r| r.p90_min)))
        .zip(get(a, |r| r.deadline_missed_pct).into_iter().zip(get(b, |r| r.deadline_missed_pct)))
        .map(|((c, (pa, pb)), (ma, mb))| {
            vec![c.clone(), format!("{pa:.1}"), format!("{pb:.1}"), format!("{ma:.1} %"), format!("{mb:.1} %")]
        })
        .collect();
    s.push_str("<h2>Side by side</h2>");
    s.push_str(&table(&["case kind", "p90 A", "p90 B", "missed A", "missed B"], &rows));
    s.push_str("</body></html>\n");
    s
}

/// CSV of the comparison: one row per (tier, modality) load and per case kind.
pub fn compare_csv(a: &Metrics, b: &Metrics) -> String {
    let mut s = String::from("figure,key,a,b\n");
    for t in TIERS {
        for md in ["ecg", "imaging", "pathology"] {
            let (x, y) = (a.load_at(t, md), b.load_at(t, md));
            if x > 0 || y > 0 {
                let _ = writeln!(s, "tier_load,{t}:{md},{x},{y}");
            }
        }
    }
    for r in &a.turnaround {
        let other = b.turnaround.iter().find(|o| o.modality == r.modality && o.urgency == r.urgency);
        let _ = writeln!(
            s,
            "p90_min,{}:{},{:.2},{:.2}",
            r.modality,
            r.urgency,
            r.p90_min,
            other.map_or(0.0, |o| o.p90_min)
        );
        let _ = writeln!(
            s,
            "deadline_missed_pct,{}:{},{:.2},{:.2}",
            r.modality,
            r.urgency,
            r.deadline_missed_pct,
            other.map_or(0.0, |o| o.deadline_missed_pct)
        );
    }
    s
}
