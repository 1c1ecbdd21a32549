//! The audit log as IHE ATNA audit messages (issue #11): each hash-chained audit
//! record as a DICOM PS3.15 Annex A.5 audit message (the XML derived from RFC 3881),
//! framed for syslog (RFC 5424, IHE's `IHE+RFC-3881` MSGID) and sent over UDP
//! (RFC 5426) to an audit record repository, or written one message per line by
//! `telemed-node audit export --format atna`.
//!
//! Vocabulary: EventID from DICOM's audit events (CID 400: 110110 Patient Record for
//! case and report events, 110114 User Authentication for link and peer events,
//! 110100 Application Activity otherwise), the same mapping as the FHIR AuditEvent
//! export (`fhir.rs`); the node is the audit source (type 4, application server);
//! the case is a participant object (type 2 system object, role 3 report, ID type
//! 110180 Study Instance UID is not used: cases have their own ID scheme, so the
//! ID type is the node's code `telemed-case`); the hash chain (seq, hash, previous
//! hash, signer, signature) goes in ParticipantObjectDetail values (base64).
//!
//! Audit records carry case IDs and node names, never patient identifiers; this
//! module must never add any. It only formats and sends; the store is the record.

use std::net::{SocketAddr, UdpSocket};

use federation_proto::NodeName;

use crate::store::AuditRecord;

/// RFC 5424 PRI: facility 10 (security/authorization), severity 5 (notice).
const PRI: u8 = 10 * 8 + 5;
/// The MSGID IHE ITI TF-2 (ITI-20) gives DICOM/RFC 3881 audit messages.
pub const MSGID: &str = "IHE+RFC-3881";
/// Largest syslog message sent over UDP (RFC 5426 says 480 octets must be accepted,
/// and that larger messages should fit the path MTU; 65 000 fits one datagram on
/// loopback and most audit repositories accept it).
pub const UDP_MESSAGE_BYTES_MAX: usize = 65_000;

/// Escapes text for an XML attribute value.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 forbids most control characters, even escaped.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A coded value in the A.5 form: `csd-code`, `codeSystemName`, `originalText`.
fn coded(element: &str, code: &str, system: &str, meaning: &str) -> String {
    format!(r#"<{element} csd-code="{}" codeSystemName="{}" originalText="{}"/>"#, esc(code), esc(system), esc(meaning))
}

/// One audit record as a DICOM PS3.15 A.5 `AuditMessage` (one line, no declaration).
pub fn audit_message(record: &AuditRecord, node: &NodeName) -> String {
    let kind = record.kind.as_str();
    let crate::fhir::AuditClass { code: event_code, meaning: event_meaning, action, refused } =
        crate::fhir::AuditClass::of(kind);
    let outcome = if refused { "4" } else { "0" };
    let node = esc(node.as_str());
    let mut xml = String::with_capacity(1024);
    xml.push_str("<AuditMessage>");
    xml.push_str(&format!(
        r#"<EventIdentification EventActionCode="{action}" EventDateTime="{}" EventOutcomeIndicator="{outcome}">"#,
        crate::fhir::instant(record.at)
    ));
    xml.push_str(&coded("EventID", event_code, "DCM", event_meaning));
    xml.push_str(&coded("EventTypeCode", kind, "telemed-audit-kind", kind));
    if !record.detail.is_empty() {
        xml.push_str(&format!("<EventOutcomeDescription>{}</EventOutcomeDescription>", esc(&record.detail)));
    }
    xml.push_str("</EventIdentification>");
    xml.push_str(&format!(r#"<ActiveParticipant UserID="{node}" UserIsRequestor="false">"#));
    xml.push_str(&coded("RoleIDCode", "110153", "DCM", "Source Role ID"));
    xml.push_str("</ActiveParticipant>");
    if let Some(peer) = &record.peer {
        xml.push_str(&format!(r#"<ActiveParticipant UserID="{}" UserIsRequestor="false">"#, esc(peer)));
        xml.push_str(&coded("RoleIDCode", "110152", "DCM", "Destination Role ID"));
        xml.push_str("</ActiveParticipant>");
    }
    xml.push_str(&format!(r#"<AuditSourceIdentification AuditSourceID="{node}">"#));
    xml.push_str(&coded("AuditSourceTypeCode", "4", "DCM", "Application Server"));
    xml.push_str("</AuditSourceIdentification>");
    let detail = |name: &str, bytes: &[u8]| {
        format!(r#"<ParticipantObjectDetail type="{name}" value="{}"/>"#, crate::fhir::b64(bytes))
    };
    let chain = [
        detail("seq", record.seq.to_string().as_bytes()),
        detail("hash", &record.hash.0),
        detail("prev_hash", &record.prev_hash.0),
        detail("signer", &record.signer.0),
        detail("signature", &record.signature),
    ]
    .concat();
    if let Some(case) = record.case {
        xml.push_str(&format!(
            r#"<ParticipantObjectIdentification ParticipantObjectID="{case}" ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3">"#
        ));
        xml.push_str(&coded("ParticipantObjectIDTypeCode", "telemed-case", "telemed", "Case ID"));
        xml.push_str(&chain);
        xml.push_str("</ParticipantObjectIdentification>");
    } else {
        xml.push_str(&format!(
            r#"<ParticipantObjectIdentification ParticipantObjectID="{}" ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="13">"#,
            record.seq
        ));
        xml.push_str(&coded("ParticipantObjectIDTypeCode", "telemed-audit-seq", "telemed", "Audit record"));
        xml.push_str(&chain);
        xml.push_str("</ParticipantObjectIdentification>");
    }
    xml.push_str("</AuditMessage>");
    xml
}

/// An audit message as one RFC 5424 syslog message: `<85>1 TIMESTAMP HOST
/// telemed-node - IHE+RFC-3881 - BOM<?xml ...?><AuditMessage>...`.
pub fn syslog_message(record: &AuditRecord, node: &NodeName) -> Vec<u8> {
    // HOSTNAME is PRINTUSASCII, at most 255 characters: a node name is.
    let host: String = node.as_str().chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
    let header = format!("<{PRI}>1 {} {host} telemed-node - {MSGID} - ", crate::fhir::instant(record.at));
    let mut out = header.into_bytes();
    out.extend_from_slice(b"\xEF\xBB\xBF"); // the UTF-8 BOM RFC 5424 asks for before UTF-8 text
    out.extend_from_slice(br#"<?xml version="1.0" encoding="UTF-8"?>"#);
    out.extend_from_slice(audit_message(record, node).as_bytes());
    out
}

/// Why audit messages could not be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AtnaError {
    #[error("syslog over UDP to {addr}: {source}")]
    Send { addr: SocketAddr, source: std::io::Error },
    #[error("an audit message of {bytes} bytes is larger than one syslog datagram ({UDP_MESSAGE_BYTES_MAX})")]
    TooLarge { bytes: usize },
}

/// Sends audit messages to an audit record repository over syslog/UDP (RFC 5426),
/// one datagram each. UDP gives no delivery guarantee: the store stays the record,
/// and a lost message can be sent again by a later export.
pub struct SyslogUdp {
    socket: UdpSocket,
    addr: SocketAddr,
}

impl SyslogUdp {
    pub fn new(addr: SocketAddr) -> Result<SyslogUdp, AtnaError> {
        let local: SocketAddr =
            if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
        let socket = UdpSocket::bind(local).map_err(|source| AtnaError::Send { addr, source })?;
        Ok(SyslogUdp { socket, addr })
    }

    pub fn send(&self, record: &AuditRecord, node: &NodeName) -> Result<(), AtnaError> {
        let msg = syslog_message(record, node);
        if msg.len() > UDP_MESSAGE_BYTES_MAX {
            return Err(AtnaError::TooLarge { bytes: msg.len() });
        }
        self.socket.send_to(&msg, self.addr).map_err(|source| AtnaError::Send { addr: self.addr, source })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use federation_proto::{CaseId, ContentHash, PublicKey};

    fn record(kind: &str, detail: &str) -> AuditRecord {
        AuditRecord {
            seq: 7,
            at: federation_proto::Millis(1_764_000_000_000),
            kind: kind.into(),
            case: Some(CaseId([3; 16])),
            peer: Some("gaocheng.dengfeng.zhengzhou.henan.cn".into()),
            detail: detail.into(),
            prev_hash: ContentHash([1; 32]),
            hash: ContentHash([2; 32]),
            signer: PublicKey([4; 32]),
            signature: vec![5; 64],
        }
    }

    #[test]
    fn a_syslog_message_has_the_rfc_5424_header_and_escapes_the_detail() {
        let node = NodeName::from("v1.gaocheng.dengfeng.zhengzhou.henan.cn");
        let msg = syslog_message(&record("case.refused", r#"a <b> & "c""#), &node);
        let text = String::from_utf8(msg).unwrap();
        let (header, body) = text.split_once('\u{feff}').expect("BOM before the message");
        assert_eq!(
            header,
            "<85>1 2025-11-24T16:00:00.000Z v1.gaocheng.dengfeng.zhengzhou.henan.cn telemed-node - IHE+RFC-3881 - "
        );
        assert!(body.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?><AuditMessage>"));
        assert!(body.contains("EventOutcomeIndicator=\"4\""), "refused is a minor failure");
        assert!(body.contains("a &lt;b&gt; &amp; &quot;c&quot;"), "{body}");
        assert!(!body.contains("<b>"));
    }
}
