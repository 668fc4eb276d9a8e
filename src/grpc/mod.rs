//! The gRPC wire format, in one place for both h2 mode and the health probe: status codes
//! and their names, the `grpc-status` header (one strict parser), the Trailers-Only
//! response the proxy answers with itself, and the HTTP-to-gRPC status mapping.
//!
//! # Layout
//! - this file: [`Code`] and the codes' names, `grpc-status`, Trailers-Only and status
//!   trailers, and [`WireError`], what the codecs below report.
//! - [`message`]: `grpc-message`, percent-encoded both ways.
//! - [`timeout`]: `grpc-timeout`, read and written.
//! - [`frame`]: the 5-byte prefix in front of every message.
//! - [`health`]: the two `grpc.health.v1` messages the health probe sends and reads.
//!
//! Header names are [`HeaderName`] constants: looking a header up by `&str` parses the name
//! again on every call (a few hundred instructions each, twice or three times per call in
//! h2 mode's profiles).

pub mod frame;
pub mod health;
pub mod message;
pub mod timeout;

use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::{Response, StatusCode};

pub use message::{decode_message, encode_message};
pub use timeout::{format_timeout, parse_timeout, timeout_in};

/// `grpc-status`.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-timeout`.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The media type of every gRPC request and response (responses may add a suffix such as
/// `+proto`).
pub const CONTENT_TYPE_GRPC: &str = "application/grpc";

/// The names of the gRPC status codes, indexed by code (the gRPC spec's `statuscodes.md`).
const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The gRPC status codes portshare sends or maps to itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    /// The call was cancelled (by the client, or a backend reset it with CANCEL).
    Cancelled = 1,
    /// An error that cannot be classified.
    Unknown = 2,
    /// The call's deadline passed before the proxy could place it.
    DeadlineExceeded = 4,
    /// The caller lacks permission (HTTP 403).
    PermissionDenied = 7,
    /// The proxy is at its limit of calls in flight.
    ResourceExhausted = 8,
    /// The server does not know the method (HTTP 404).
    Unimplemented = 12,
    /// A protocol-level failure of the backend.
    Internal = 13,
    /// No backend could take the call, or it died mid-call: the client may retry.
    Unavailable = 14,
    /// The caller is not authenticated (HTTP 401).
    Unauthenticated = 16,
}

impl Code {
    /// The number sent in `grpc-status`.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The name the gRPC spec gives the code.
    pub fn name(self) -> &'static str {
        code_name(self.as_u32())
    }

    /// The code a client derives from a non-200 HTTP status that came without a
    /// `grpc-status` (the gRPC spec's `http-grpc-status-mapping.md`).
    pub fn from_http(status: StatusCode) -> Self {
        match status.as_u16() {
            400 => Self::Internal,
            401 => Self::Unauthenticated,
            403 => Self::PermissionDenied,
            404 => Self::Unimplemented,
            429 | 502..=504 => Self::Unavailable,
            _ => Self::Unknown,
        }
    }
}

/// The name of any status code, `"unknown code"` past the ones the spec defines.
pub fn code_name(code: u32) -> &'static str {
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("unknown code")
}

/// What broke the gRPC or protobuf wire format, or could not be put in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A message longer than a frame's 32-bit length can say.
    #[error("a {0}-byte message does not fit in a gRPC frame")]
    TooLarge(usize),
    /// What a peer sent is not what the format allows: a truncated frame or varint, a
    /// wrong wire type, trailing bytes, ….
    #[error("{0}")]
    Malformed(String),
}

/// Why a `grpc-status` value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadStatus {
    /// Empty, or something other than ASCII digits (a sign, a space).
    #[error("is not a number")]
    NotANumber,
    /// Digits, but more than a `u32` holds.
    #[error("is out of range")]
    OutOfRange,
}

/// A `grpc-status` value: ASCII digits only (the spec's grammar: no sign, no spaces), and
/// it must fit in a `u32`. Reads the bytes in place, since h2 mode does this for every call.
pub fn parse_status(value: &[u8]) -> Result<u32, BadStatus> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(BadStatus::NotANumber);
    }
    value
        .iter()
        .try_fold(0u32, |n, d| {
            n.checked_mul(10)?.checked_add(u32::from(d - b'0'))
        })
        .ok_or(BadStatus::OutOfRange)
}

/// The `grpc-status` in a header block; `None` when absent or malformed (a malformed one
/// is no status a caller could act on).
pub fn status(headers: &HeaderMap) -> Option<u32> {
    parse_status(headers.get(&GRPC_STATUS)?.as_bytes()).ok()
}

/// A Trailers-Only response: HTTP 200 whose only HEADERS frame carries the gRPC status and
/// ends the stream, as gRPC servers answer a call they reject.
pub fn trailers_only<B: Default>(code: Code, message: &str) -> Response<B> {
    let mut r = Response::new(B::default());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_GRPC));
    insert_status(h, code, message);
    r
}

/// Trailers carrying a gRPC status, for a call whose response had already begun.
pub fn status_trailers(code: Code, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    insert_status(&mut h, code, message);
    h
}

/// Adds `grpc-status` and the encoded `grpc-message`.
fn insert_status(h: &mut HeaderMap, code: Code, message: &str) {
    h.insert(GRPC_STATUS, HeaderValue::from(code.as_u32()));
    // Always valid: the encoding leaves only visible ASCII and spaces.
    if let Ok(v) = HeaderValue::from_str(&encode_message(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_digits_that_fit_a_u32() {
        assert_eq!(parse_status(b"0"), Ok(0));
        assert_eq!(parse_status(b"14"), Ok(14));
        assert_eq!(parse_status(b"0012"), Ok(12));
        assert_eq!(parse_status(b"4294967295"), Ok(u32::MAX));
        assert_eq!(parse_status(b"4294967296"), Err(BadStatus::OutOfRange));
        assert_eq!(parse_status(b"99999999999"), Err(BadStatus::OutOfRange));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b" 1",
            b"1 ",
            b"x",
            b"1.0",
            b"\xd9\xa1",
        ] {
            assert_eq!(parse_status(bad), Err(BadStatus::NotANumber), "{bad:?}");
        }
    }

    #[test]
    fn status_in_headers_ignores_a_malformed_one() {
        let mut h = HeaderMap::new();
        assert_eq!(status(&h), None);
        h.insert(GRPC_STATUS, HeaderValue::from_static("7"));
        assert_eq!(status(&h), Some(7));
        h.insert(GRPC_STATUS, HeaderValue::from_static("+1"));
        assert_eq!(status(&h), None);
    }

    #[test]
    fn codes_have_their_spec_names() {
        assert_eq!(Code::Unavailable.name(), "UNAVAILABLE");
        assert_eq!(Code::Unauthenticated.as_u32(), 16);
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(12), "UNIMPLEMENTED");
        assert_eq!(code_name(17), "unknown code");
        assert_eq!(code_name(u32::MAX), "unknown code");
        for code in [
            Code::Cancelled,
            Code::Unknown,
            Code::DeadlineExceeded,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::Unauthenticated,
        ] {
            assert_eq!(
                format!("{code:?}").to_ascii_uppercase(),
                code.name().replace('_', ""),
            );
        }
    }

    #[test]
    fn http_statuses_map_as_the_spec_says() {
        let cases = [
            (400, Code::Internal),
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (404, Code::Unimplemented),
            (429, Code::Unavailable),
            (502, Code::Unavailable),
            (503, Code::Unavailable),
            (504, Code::Unavailable),
            (500, Code::Unknown),
            (301, Code::Unknown),
        ];
        for (http, code) in cases {
            let status = StatusCode::from_u16(http).expect("a status");
            assert_eq!(Code::from_http(status), code, "{http}");
        }
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
    fn status_trailers_carry_the_code_and_the_encoded_message() {
        let t = status_trailers(Code::Cancelled, "précis");
        assert_eq!(t["grpc-status"], "1");
        assert_eq!(t["grpc-message"], "pr%C3%A9cis");
    }
}
