//! The bits of gRPC that h2 mode speaks itself: status codes, Trailers-Only responses for
//! calls it cannot place, the `grpc-timeout` header, and which gRPC status an HTTP/2 failure
//! of the backend amounts to.

use std::time::Duration;

use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::{Response, StatusCode};

// Header names as constants: looking a header up by `&str` parses the name again on every
// call (a few hundred instructions each, twice or three times per call in profiles).
/// `grpc-status`.
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub(crate) const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-timeout`.
pub(crate) const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// gRPC status codes used by the proxy itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    /// The call was cancelled (by the client, or a backend reset it with CANCEL).
    Cancelled = 1,
    /// An error the proxy cannot classify.
    Unknown = 2,
    /// The call's deadline passed before the proxy could place it.
    DeadlineExceeded = 4,
    /// The proxy is at its limit of calls in flight.
    ResourceExhausted = 8,
    /// A protocol-level failure of the backend.
    Internal = 13,
    /// No backend could take the call, or it died mid-call: the client may retry.
    Unavailable = 14,
}

impl Code {
    /// The number sent in `grpc-status`.
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}

/// A Trailers-Only response: HTTP 200 whose only HEADERS frame carries the gRPC status and
/// ends the stream, as gRPC servers answer a call they reject.
pub fn trailers_only<B: Default>(code: Code, message: &str) -> Response<B> {
    let mut r = Response::new(B::default());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(GRPC_STATUS, HeaderValue::from(code.as_u32()));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
    r
}

/// Trailers carrying a gRPC status, for a call whose response had already begun.
pub fn status_trailers(code: Code, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(GRPC_STATUS, HeaderValue::from(code.as_u32()));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
    h
}

/// `grpc-message` is percent-encoded: anything outside printable ASCII, and `%` itself.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The call's deadline from `grpc-timeout` (1 to 8 digits and a unit: H, M, S, m, u, n).
/// A malformed value is ignored, as gRPC servers do.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-status` in a header block, if any.
pub fn status(headers: &HeaderMap) -> Option<u32> {
    headers.get(&GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// Whether a failed call certainly never reached the backend's application: the stream was
/// refused (REFUSED_STREAM) or lay beyond the last stream a GOAWAY let through.
pub fn never_processed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
}

/// The gRPC status a backend failure amounts to, as gRPC clients map HTTP/2 resets:
/// REFUSED_STREAM means the backend never processed the call (UNAVAILABLE, safe to retry),
/// CANCEL means CANCELLED; a lost or closing connection is UNAVAILABLE; any other reset
/// INTERNAL.
pub fn code_for(e: &h2::Error) -> Code {
    if e.is_io() || e.is_go_away() {
        return Code::Unavailable;
    }
    match e.reason() {
        Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(h2::Reason::CANCEL) => Code::Cancelled,
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(_) => Code::Internal,
        None => Code::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "grpc-timeout",
            HeaderValue::from_str(timeout).expect("header"),
        );
        h
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(timeout(&headers("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(timeout(&headers("2M")), Some(Duration::from_secs(120)));
        assert_eq!(timeout(&headers("3S")), Some(Duration::from_secs(3)));
        assert_eq!(
            timeout(&headers("1500m")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(timeout(&headers("7u")), Some(Duration::from_micros(7)));
        assert_eq!(
            timeout(&headers("99999999n")),
            Some(Duration::from_nanos(99_999_999))
        );
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for bad in [
            "",
            "S",
            "10",
            "123456789S",
            "1x",
            "-1S",
            "1.5S",
            " 1S",
            "1s",
        ] {
            let h = HeaderValue::from_str(bad).map(|v| {
                let mut h = HeaderMap::new();
                h.insert("grpc-timeout", v);
                h
            });
            if let Ok(h) = h {
                assert_eq!(timeout(&h), None, "{bad:?}");
            }
        }
        assert_eq!(timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn trailers_only_carries_status_and_an_encoded_message() {
        let r: Response<String> = trailers_only(Code::Unavailable, "no backend: 100% busy\n");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no backend: 100%25 busy%0A");
        assert_eq!(status(r.headers()), Some(14));
    }

    #[test]
    fn non_ascii_messages_are_percent_encoded_as_utf8() {
        assert_eq!(percent_encode("précis"), "pr%C3%A9cis");
        assert_eq!(status_trailers(Code::Cancelled, "x")["grpc-status"], "1");
    }
}
