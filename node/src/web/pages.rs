//! The HTML pages, rendered with maud: every interpolated value is escaped (only the
//! server-generated ECG SVG is inserted pre-escaped, and it escapes its own text).
//!
//! This module must never read state or decide anything: it renders what it is given.

use super::auth::Role;
use super::{QueueFilter, WebContext, Who};
use crate::daemon::{AdminSnapshot, CaseSnapshot};
use crate::view::now;
use axum::http::StatusCode;
use maud::{DOCTYPE, Markup, PreEscaped, html};

/// `HH:MM:SS UTC` of a time in ms since the epoch (with the date if not today).
pub fn clock(ms: u64) -> String {
    let s = ms / 1000;
    let (days, rem) = (s / 86_400, s % 86_400);
    let today = now().0 / 1000 / 86_400;
    let hms = format!("{:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60);
    if days == today { hms } else { format!("{} {hms}", date(days)) }
}

/// `YYYY-MM-DD` of a day number since the Unix epoch (civil-from-days, H. Hinnant).
pub fn date(days: u64) -> String {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s / 60)
    } else {
        format!("{:.1} h", s as f64 / 3600.0)
    }
}

fn layout(ctx: &WebContext, who: Option<&Who>, title: &str, live: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " — " (ctx.node.as_str()) }
                link rel="stylesheet" href="/assets/app.css";
                script src="/assets/app.js" defer {}
            }
            body data-server-now-ms=(now().0) data-live=[live.then_some("reload")] {
                header.top {
                    span.brand { "telemed" }
                    span.node { (ctx.node.as_str()) " · " (ctx.tier.to_string()) }
                    @if let Some(who) = who {
                        nav {
                            @if matches!(who.role, Role::Expert | Role::Admin) { a href="/queue" { "Consult queue" } }
                            @if matches!(who.role, Role::Clinician | Role::Admin) { a href="/clinic" { "Clinic" } }
                            @if who.role == Role::Admin { a href="/admin" { "Admin" } }
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(who.session.csrf);
                            span.user { (who.name) " (" (who.role.as_str()) ")" }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A page with just a message (errors, refusals).
pub fn message(status: StatusCode, text: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { (status.as_u16()) } link rel="stylesheet" href="/assets/app.css"; }
            body { main { h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) } p.message { (text) } p { a href="/" { "Back" } } } }
        }
    }
}

pub fn login(ctx: &WebContext, csrf: &str, error: Option<&str>) -> Markup {
    layout(
        ctx,
        None,
        "Log in",
        false,
        html! {
            h1 { "Log in" }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form.login method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                label { "User name " input #name type="text" name="name" autocomplete="username" required; }
                label { "Password " input #password type="password" name="password" autocomplete="current-password" required; }
                button #login type="submit" { "Log in" }
            }
        },
    )
}

fn urgency_badge(u: &str) -> Markup {
    html! { span class={ "badge urgency-" (u) } { (u.to_uppercase()) } }
}

fn countdown(deadline_ms: u64) -> Markup {
    let left = deadline_ms.saturating_sub(now().0);
    html! { span.countdown data-deadline-ms=(deadline_ms) { (duration(left)) " left" } }
}

pub fn queue(ctx: &WebContext, who: &Who, f: &QueueFilter, cases: &[CaseSnapshot]) -> Markup {
    let sel = |v: &str, cur: &str| v == cur;
    layout(
        ctx,
        Some(who),
        "Consult queue",
        true,
        html! {
            h1 { "Consult queue" }
            form.filters method="get" action="/queue" {
                label { "Modality " select name="modality" {
                    option value="" selected[f.modality.is_empty()] { "all" }
                    @for m in ["ecg", "imaging", "pathology"] { option value=(m) selected[sel(m, &f.modality)] { (m) } }
                } }
                label { "Urgency " select name="urgency" {
                    option value="" selected[f.urgency.is_empty()] { "all" }
                    @for u in ["stat", "urgent", "routine"] { option value=(u) selected[sel(u, &f.urgency)] { (u) } }
                } }
                label { "Status " select name="status" {
                    @for s in ["open", "queued", "claimed", "reported", "all"] {
                        option value=(s) selected[sel(s, &f.status) || (s == "open" && f.status.is_empty())] { (s) }
                    }
                } }
                button type="submit" { "Filter" }
            }
            @if cases.is_empty() {
                p.empty { "No cases match." }
            } @else {
                table #queue.queue {
                    thead { tr { th { "Urgency" } th { "Modality" } th { "Question" } th { "Patient" } th { "From" } th { "Deadline" } th { "Status" } th {} } }
                    tbody {
                        @for c in cases {
                            tr.case-row data-case-id=(c.view.case_id) data-urgency=(c.view.urgency) {
                                td { (urgency_badge(&c.view.urgency)) }
                                td { (c.view.modality) }
                                td.question { a href={ "/case/" (c.view.case_id) } { (c.view.question) } }
                                td { (c.view.patient) }
                                td { (c.view.origin) }
                                td { (countdown(c.view.deadline_at_ms)) }
                                td { (c.view.status) @if let Some(e) = &c.claimed_by { " by " (e) } }
                                td {
                                    @if who.role == Role::Expert && c.view.status == "queued" {
                                        form method="post" action={ "/case/" (c.view.case_id) "/claim" } {
                                            input type="hidden" name="csrf" value=(who.session.csrf);
                                            button.claim type="submit" { "Claim" }
                                        }
                                    }
                                    @if who.role == Role::Expert && c.claimed_by.as_deref() == Some(who.name.as_str()) {
                                        form method="post" action={ "/case/" (c.view.case_id) "/release" } {
                                            input type="hidden" name="csrf" value=(who.session.csrf);
                                            button.release type="submit" { "Release" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

fn report_view(r: &crate::view::ReportView) -> Markup {
    let label = |k: &str| match k {
        "conclusion" => "Conclusion".to_owned(),
        "finding" => "Finding".to_owned(),
        "recommendation" => "Recommendation".to_owned(),
        "follow_up" => "Follow-up".to_owned(),
        "impression" => "Impression".to_owned(),
        other => other.to_owned(),
    };
    html! {
        section.report {
            h2 { "Report" @if r.machine_made { " (machine-made)" } }
            p.meta { "Signed by " (r.reader) " at " (r.node) " (" (r.tier) "), " (clock(r.signed_at_ms)) }
            @if !r.labels.is_empty() {
                ul.labels { @for (l, c) in &r.labels { li { (l) " — confidence " (format!("{c:.2}")) } } }
            }
            dl.fields { @for (k, v) in &r.fields { dt { (label(k)) } dd { (v) } } }
            @if !r.text.is_empty() { p.report-text { (r.text) } }
        }
    }
}

pub fn case(
    ctx: &WebContext,
    who: &Who,
    c: &CaseSnapshot,
    ecg_svg: Option<&str>,
    viewers: &[(usize, super::viewers::ViewerKind)],
) -> Markup {
    let v = &c.view;
    let here = c.came_from.is_none();
    let mine = c.claimed_by.as_deref() == Some(who.name.as_str())
        || (v.status == "queued" && c.lapsed_claim.as_deref() == Some(who.name.as_str()));
    let id = &v.case_id;
    layout(
        ctx,
        Some(who),
        "Case",
        false,
        html! {
            h1 { (urgency_badge(&v.urgency)) " " (v.modality) " case " code { (&id[..8]) } }
            p.status { "Status: " strong #status { (v.status) } " — " (v.where_) @if v.report.is_none() { " · " (countdown(v.deadline_at_ms)) } }
            section.question { h2 { "Clinical question" } p #question { (v.question) } }
            section.patient {
                h2 { "Patient" }
                @if here {
                    p { "Reference at this clinic: " span #patient { (v.patient) } }
                } @else {
                    p { "Pseudonym: " span #patient { (v.patient) } " (direct identifiers stay at the originating clinic, " (v.origin) ")" }
                }
            }
            section.findings {
                h2 { "AI findings" }
                @if v.findings.is_empty() { p { "No model has read this case." } }
                @for f in &v.findings {
                    div.finding {
                        p { (f.reader) " at " (f.node) " (" (f.tier) "), " (clock(f.at_ms)) }
                        ul { @for (l, conf) in &f.labels { li { (l) " — confidence " (format!("{conf:.2}")) } } }
                    }
                }
            }
            section.trail {
                h2 { "Escalation trail" }
                @if v.trail.is_empty() { p { "Not moved: read where it was submitted." } } @else {
                    table.trail {
                        thead { tr { th { "Hop" } th { "From" } th { "To" } th { "Left at" } th { "Why it moved on" } } }
                        tbody { @for (i, h) in v.trail.iter().enumerate() {
                            tr {
                                td { (i + 1) }
                                td { (h.from) " (" (h.from_tier) ")" }
                                td { (h.to) " (" (h.to_tier) ")" }
                                td { (clock(h.left_at_ms)) }
                                td { (h.reason) @if !h.skipped.is_empty() { " — skipped " (h.skipped.join(", ")) } }
                            }
                        } }
                    }
                }
            }
            section.attachments {
                h2 { "Attachments" }
                ul { @for (i, (name, size, media)) in v.attachments.iter().enumerate() {
                    li data-attachment=(i) { (name) " (" (size) " bytes, " (media) ")" }
                } }
                @if let Some(svg) = ecg_svg {
                    div #ecg.viewer.ecg-viewer { (PreEscaped(svg)) }
                }
                @for (n, kind) in viewers {
                    @match kind {
                        super::viewers::ViewerKind::Image => {
                            @let url = format!("/case/{id}/attachment/{n}/image.png");
                            div.viewer.image-viewer data-attachment=(n) {
                                form.wl {
                                    label { "Window centre " input type="number" step="any" name="wc"; }
                                    label { "width " input type="number" step="any" min="1" name="ww"; }
                                    button type="submit" { "Apply" }
                                    span.hint { " Empty: the file's window. Scroll to zoom, drag to pan." }
                                }
                                div.stage { img.dicom alt="DICOM image" data-src=(url) src=(url); }
                            }
                        }
                        super::viewers::ViewerKind::Slide(levels) => {
                            div.viewer.slide-viewer data-attachment=(n)
                                data-tiles=(format!("/case/{id}/attachment/{n}/tile"))
                                data-levels=(serde_json::to_string(levels).unwrap_or_default()) {
                                div.tiles {}
                                span.hint { "Slide: scroll to change magnification, drag to pan." }
                            }
                        }
                    }
                }
            }
            @if let Some(r) = &v.report {
                (report_view(r))
            } @else if who.role == Role::Expert {
                section.actions {
                    @if v.status == "queued" && !mine {
                        form method="post" action={ "/case/" (id) "/claim" } {
                            input type="hidden" name="csrf" value=(who.session.csrf);
                            button #claim.claim type="submit" { "Claim this case" }
                        }
                    }
                    @if mine {
                        h2 { "Report" }
                        form #report.report-editor method="post" action={ "/case/" (id) "/sign" } {
                            input type="hidden" name="csrf" value=(who.session.csrf);
                            label { "Conclusion / diagnosis " input #conclusion type="text" name="conclusion" required maxlength="4096"; }
                            label { "Findings (one per line) " textarea #findings name="findings" rows="4" {} }
                            label { "Recommendation " input #recommendation type="text" name="recommendation" maxlength="4096"; }
                            label { "Follow-up " select #follow_up name="follow_up" {
                                option value="none" { "none" } option value="routine" { "routine" }
                                option value="urgent" { "urgent" } option value="stat" { "stat" }
                            } }
                            label { "Free text " textarea #text name="text" rows="6" {} }
                            button #sign type="submit" { "Sign and return" }
                        }
                        form method="post" action={ "/case/" (id) "/release" } {
                            input type="hidden" name="csrf" value=(who.session.csrf);
                            button #release.release type="submit" { "Release to the queue" }
                        }
                    }
                    @if v.status == "queued" || mine {
                        form #escalate.escalate method="post" action={ "/case/" (id) "/escalate" } {
                            input type="hidden" name="csrf" value=(who.session.csrf);
                            label { "Escalate to the tier above, because " input #reason type="text" name="reason" required maxlength="1024"; }
                            button type="submit" { "Escalate" }
                        }
                    }
                }
            }
        },
    )
}

pub fn clinic(ctx: &WebContext, who: &Who, cases: &[CaseSnapshot]) -> Markup {
    layout(
        ctx,
        Some(who),
        "Clinic",
        true,
        html! {
            h1 { "Clinic" }
            @if who.role == Role::Clinician {
                section.submit {
                    h2 { "Submit a case" }
                    form #submit method="post" action="/clinic/submit" enctype="multipart/form-data" {
                        input type="hidden" name="csrf" value=(who.session.csrf);
                        label { "Modality " select name="modality" { option value="ecg" { "ECG" } option value="imaging" { "Imaging (DICOM)" } option value="pathology" { "Pathology slide" } } }
                        label { "Urgency " select name="urgency" { option value="stat" { "STAT" } option value="urgent" { "urgent" } option value="routine" selected { "routine" } } }
                        label { "Patient reference " input type="text" name="patient" required maxlength="128";
                            span.hint { " A pseudonym or this clinic's number, never a name: it travels with the case." } }
                        label { "Clinical question " textarea name="question" rows="3" required maxlength="4096" {} }
                        label { "Files " input type="file" name="file" multiple required; }
                        button type="submit" { "Submit" }
                    }
                }
            }
            h2 { "Cases from this clinic" }
            @if cases.is_empty() { p.empty { "None yet." } }
            @for c in cases {
                article.clinic-case data-case-id=(c.view.case_id) {
                    h3 { (urgency_badge(&c.view.urgency)) " " (c.view.modality) " · " a href={ "/case/" (c.view.case_id) } { (c.view.question) } }
                    p { "Patient " (c.view.patient) " · submitted " (clock(c.view.created_at_ms)) " · " strong { (c.view.status) } " — " (c.view.where_) }
                    @if let Some(r) = &c.view.report { (report_view(r)) }
                }
            }
        },
    )
}

pub fn admin(ctx: &WebContext, who: &Who, s: &AdminSnapshot, cases: &[CaseSnapshot], sessions: usize) -> Markup {
    let now_s = now().0 / 1000;
    let days_left = (ctx.cert_not_after_s as i64 - now_s as i64) / 86_400;
    let mut by_status: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for c in cases {
        *by_status.entry((c.view.status.clone(), c.view.modality.clone())).or_default() += 1;
    }
    layout(
        ctx,
        Some(who),
        "Admin",
        false,
        html! {
            h1 { "Node " (ctx.node.as_str()) }
            section.identity {
                h2 { "Identity" }
                dl {
                    dt { "Name" } dd #node-name { (ctx.node.as_str()) }
                    dt { "Tier" } dd { (ctx.tier.to_string()) }
                    dt { "Certificate expires" } dd #cert-expiry class=[(days_left < 14).then_some("warn")] {
                        (date(ctx.cert_not_after_s / 86_400)) " (" (days_left) " days left)"
                    }
                    dt { "Web sessions" } dd { (sessions) }
                }
            }
            section.links {
                h2 { "Peers and links" }
                table #links {
                    thead { tr { th { "Peer" } th { "Tier" } th { "Role" } th { "Link" } } }
                    tbody {
                        @for (i, (name, tier, addr)) in ctx.parents.iter().enumerate() {
                            @let up = s.status.links.iter().any(|(n, _)| n == name);
                            tr {
                                td { (name) " (" (addr) ")" } td { (tier) }
                                td { @if i == 0 { "parent" } @else { "alternate parent" } }
                                td class=(if up { "up" } else { "down warn" }) { @if up { "up" } @else { "down" } }
                            }
                        }
                        @for (peer, tier) in s.status.links.iter().filter(|(n, _)| !ctx.parents.iter().any(|p| &p.0 == n)) {
                            tr { td { (peer) } td { (tier) } td { "child" } td.up { "up" } }
                        }
                    }
                }
            }
            section.queues {
                h2 { "Cases held, by status" }
                table { thead { tr { th { "Status" } th { "Modality" } th { "Cases" } } }
                    tbody { @for ((st, m), n) in &by_status { tr { td { (st) } td { (m) } td { (n) } } } } }
            }
            section.advert {
                h2 { "Capacity advert" }
                @if let Some(a) = &s.advert {
                    p { "Valid until " (clock(a.valid_until.0)) }
                    table { thead { tr { th { "Modality" } th { "Model tasks" } th { "Experts on duty" } th { "Queue" } th { "ETA" } } }
                        tbody { @for m in &a.capacity { tr {
                            td { (m.modality.to_string()) } td { (m.model_tasks.join(", ")) } td { (m.experts_on_duty) }
                            td { (m.queue_len) } td { @if m.eta_ms == u64::MAX { "—" } @else { (duration(m.eta_ms)) } }
                        } } } }
                } @else { p { "No advert." } }
            }
            section.audit {
                h2 { "Recent audit events" }
                table #audit { thead { tr { th { "#" } th { "Time" } th { "What" } th { "Case" } th { "Peer" } th { "Detail" } } }
                    tbody { @for r in s.audit.iter().rev() { tr {
                        td { (r.seq) } td { (clock(r.at.0)) } td { (r.kind) }
                        td { @if let Some(c) = &r.case { a href={ "/case/" (c) } { (c.to_string()[..8].to_owned()) } } }
                        td { (r.peer.clone().unwrap_or_default()) } td { (r.detail) }
                    } } } }
            }
            section.metrics { h2 { "Metrics" } pre { (s.metrics) } }
        },
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_civil() {
        assert_eq!(super::date(0), "1970-01-01");
        assert_eq!(super::date(20_000), "2024-10-04");
    }
}
