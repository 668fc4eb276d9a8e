//! The two messages of `grpc.health.v1.Health/Check`, encoded and decoded by hand:
//! `HealthCheckRequest { string service = 1; }` and
//! `HealthCheckResponse { ServingStatus status = 1; }`. They are small enough that
//! portshare needs no protobuf crate for them; the probe that sends them is
//! [`crate::health::grpc`].

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use super::{WireError, frame};

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServingStatus {
    /// `UNKNOWN` (0): the server does not know; also any value this client does not know,
    /// and a response that leaves the field out (proto3 omits a zero field).
    Unknown,
    /// `SERVING` (1).
    Serving,
    /// `NOT_SERVING` (2).
    NotServing,
    /// `SERVICE_UNKNOWN` (3): only sent by the streaming `Watch`, mapped for completeness.
    ServiceUnknown,
}

impl ServingStatus {
    /// Maps the enum's wire value. proto3 enums are open, so numbers added to the enum
    /// after this was written read as [`ServingStatus::Unknown`] instead of failing.
    pub fn from_wire(value: i32) -> Self {
        match value {
            1 => Self::Serving,
            2 => Self::NotServing,
            3 => Self::ServiceUnknown,
            _ => Self::Unknown,
        }
    }

    /// The name the `.proto` file gives the value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "UNKNOWN",
            Self::Serving => "SERVING",
            Self::NotServing => "NOT_SERVING",
            Self::ServiceUnknown => "SERVICE_UNKNOWN",
        }
    }
}

impl fmt::Display for ServingStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Shorthand for a [`WireError::Malformed`].
fn malformed(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

/// Appends `value` as a protobuf base-128 varint: 7 bits a byte, least significant first,
/// the top bit set on every byte but the last.
pub fn encode_varint(mut value: u64, out: &mut BytesMut) {
    while value >= 0x80 {
        out.put_u8((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

/// Reads a varint from the front of `buf`: its value and how many bytes it took.
pub fn decode_varint(buf: &[u8]) -> Result<(u64, usize), WireError> {
    let mut value = 0u64;
    // A u64 needs at most 10 groups of 7 bits; the 10th may only hold the top bit.
    for (i, &byte) in buf.iter().take(10).enumerate() {
        if i == 9 && byte > 1 {
            return Err(malformed("varint overflows 64 bits"));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(malformed("truncated varint"))
}

/// `buf` without its first `n` bytes, or an error naming `what` was cut short.
fn skip<'a>(buf: &'a [u8], n: usize, what: &str) -> Result<&'a [u8], WireError> {
    buf.get(n..)
        .ok_or_else(|| malformed(format!("truncated {what}")))
}

/// Protobuf field 1 with wire type 2 (length-delimited): `1 << 3 | 2`.
const REQUEST_SERVICE_TAG: u8 = 0x0a;

/// Protobuf wire types (the low three bits of a field's key).
const WIRE_VARINT: u64 = 0;
/// 8 fixed bytes (`fixed64`, `sfixed64`, `double`).
const WIRE_FIXED64: u64 = 1;
/// A varint length, then that many bytes (strings, bytes, messages, packed fields).
const WIRE_LEN: u64 = 2;
/// 4 fixed bytes (`fixed32`, `sfixed32`, `float`).
const WIRE_FIXED32: u64 = 5;

/// `HealthCheckRequest { service }` as protobuf. proto3 leaves a field at its default
/// value out, so an empty service is an empty message.
fn encode_request(service: &str) -> Bytes {
    let mut out = BytesMut::new();
    if !service.is_empty() {
        out.put_u8(REQUEST_SERVICE_TAG);
        encode_varint(service.len() as u64, &mut out);
        out.put_slice(service.as_bytes());
    }
    out.freeze()
}

/// The request body: the encoded request behind its gRPC prefix.
pub fn encode_request_frame(service: &str) -> Result<Bytes, WireError> {
    frame::encode(&encode_request(service))
}

/// Decodes a whole response body: exactly one uncompressed gRPC message holding a
/// `HealthCheckResponse`.
pub fn decode_response_frame(body: &[u8]) -> Result<ServingStatus, WireError> {
    if body.is_empty() {
        return Err(malformed("grpc-status 0 without a response message"));
    }
    decode_response(frame::decode_one(body)?)
}

/// Decodes `HealthCheckResponse { ServingStatus status = 1; }`, skipping fields a newer
/// schema may have added.
pub fn decode_response(mut msg: &[u8]) -> Result<ServingStatus, WireError> {
    // proto3: a missing field holds its default, 0 = UNKNOWN.
    let mut status = 0i32;
    while !msg.is_empty() {
        let (key, n) = decode_varint(msg)?;
        msg = skip(msg, n, "field key")?;
        if key >> 3 == 0 || key > u64::from(u32::MAX) {
            return Err(malformed(format!("invalid field key {key}")));
        }
        let (field, wire) = (key >> 3, key & 0x7);
        match (field, wire) {
            (1, WIRE_VARINT) => {
                let (value, n) = decode_varint(msg)?;
                msg = skip(msg, n, "status")?;
                // Enums are int32 on the wire, negative ones sign-extended to 64 bits;
                // truncating is what protobuf specifies. Repeats: the last one wins.
                status = value as i32;
            }
            (1, _) => {
                return Err(malformed(format!(
                    "status field has wire type {wire}, not varint"
                )));
            }
            (_, WIRE_VARINT) => {
                let (_, n) = decode_varint(msg)?;
                msg = skip(msg, n, "varint field")?;
            }
            (_, WIRE_FIXED64) => msg = skip(msg, 8, "64-bit field")?,
            (_, WIRE_LEN) => {
                let (len, n) = decode_varint(msg)?;
                msg = skip(msg, n, "length-delimited field")?;
                let len = usize::try_from(len)
                    .map_err(|_| malformed("truncated length-delimited field"))?;
                msg = skip(msg, len, "length-delimited field")?;
            }
            (_, WIRE_FIXED32) => msg = skip(msg, 4, "32-bit field")?,
            // 3 and 4 are the long-deprecated groups, never used in proto3; 6 and 7 do
            // not exist.
            (_, other) => {
                return Err(malformed(format!("unsupported wire type {other}")));
            }
        }
    }
    Ok(ServingStatus::from_wire(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- encoder ----

    #[test]
    fn empty_service_is_an_empty_message_in_a_5_byte_frame() {
        assert!(encode_request("").is_empty());
        // Flag 0 (uncompressed), length 0 as a big-endian u32, no payload.
        assert_eq!(&encode_request_frame("").unwrap()[..], &[0, 0, 0, 0, 0]);
    }

    #[test]
    fn service_name_is_field_1_length_delimited() {
        // "portshare.test.Echo" is 19 bytes. Key: field 1, wire type 2 -> (1 << 3) | 2 =
        // 0x0a; length 19 = 0x13 fits one varint byte; message = 1 + 1 + 19 = 21 = 0x15.
        let mut expected = vec![0x00, 0x00, 0x00, 0x00, 0x15, 0x0a, 0x13];
        expected.extend_from_slice(b"portshare.test.Echo");
        assert_eq!(
            &encode_request_frame("portshare.test.Echo").unwrap()[..],
            &expected[..]
        );
    }

    #[test]
    fn long_service_name_gets_a_two_byte_length_varint() {
        // 300 = 0b10_0101100: low 7 bits 0x2c with the continuation bit -> 0xac, then
        // 300 >> 7 = 2 -> 0x02. Message: 1 + 2 + 300 = 303 = 0x012f.
        let name = "x".repeat(300);
        let frame = encode_request_frame(&name).unwrap();
        assert_eq!(
            &frame[..8],
            &[0x00, 0x00, 0x00, 0x01, 0x2f, 0x0a, 0xac, 0x02]
        );
        assert_eq!(&frame[8..], name.as_bytes());
    }

    #[test]
    fn varints_round_trip_at_the_byte_boundaries() {
        let cases: [(u64, &[u8]); 6] = [
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (150, &[0x96, 0x01]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for (value, bytes) in cases {
            let mut out = BytesMut::new();
            encode_varint(value, &mut out);
            assert_eq!(&out[..], bytes, "encoding {value}");
            assert_eq!(decode_varint(bytes).unwrap(), (value, bytes.len()));
        }
    }

    // ---- decoder ----

    /// `msg` behind a gRPC message prefix.
    fn frame(msg: &[u8]) -> Bytes {
        frame::encode(msg).expect("a small message")
    }

    fn assert_malformed(result: Result<ServingStatus, WireError>) {
        assert!(
            matches!(result, Err(WireError::Malformed(_))),
            "expected Malformed, got {result:?}"
        );
    }

    #[test]
    fn decodes_each_status() {
        // Key 0x08 = field 1, wire type 0 (varint).
        let cases = [
            (0, ServingStatus::Unknown),
            (1, ServingStatus::Serving),
            (2, ServingStatus::NotServing),
            (3, ServingStatus::ServiceUnknown),
        ];
        for (value, status) in cases {
            assert_eq!(
                decode_response_frame(&frame(&[0x08, value])).unwrap(),
                status
            );
        }
    }

    #[test]
    fn missing_status_field_is_unknown() {
        assert_eq!(
            decode_response_frame(&frame(&[])).unwrap(),
            ServingStatus::Unknown
        );
    }

    #[test]
    fn values_beyond_the_enum_are_unknown() {
        let cases: [&[u8]; 3] = [
            &[0x08, 0x04],
            // 150, two varint bytes.
            &[0x08, 0x96, 0x01],
            // -1: a negative int32 is sign-extended to ten bytes.
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ];
        for msg in cases {
            assert_eq!(
                decode_response_frame(&frame(msg)).unwrap(),
                ServingStatus::Unknown,
                "{msg:02x?}"
            );
        }
        // 2^32 + 1 truncates to 1, as int32 fields do in protobuf.
        assert_eq!(
            decode_response(&[0x08, 0x81, 0x80, 0x80, 0x80, 0x10]).unwrap(),
            ServingStatus::Serving
        );
    }

    #[test]
    fn unknown_fields_of_every_wire_type_are_skipped() {
        let msg = [
            0x10, 0x96, 0x01, // field 2, varint 150
            0x19, 1, 2, 3, 4, 5, 6, 7, 8, // field 3, fixed64
            0x22, 0x03, b'a', b'b', b'c', // field 4, 3 length-delimited bytes
            0x2d, 1, 2, 3, 4, // field 5, fixed32
            0x08, 0x01, // field 1 = SERVING
            0xa0, 0x1f, 0x07, // field 500 (key 4000 = 0xa0 0x1f), varint 7
        ];
        assert_eq!(
            decode_response_frame(&frame(&msg)).unwrap(),
            ServingStatus::Serving
        );
        // A repeated singular field: the last value wins.
        assert_eq!(
            decode_response(&[0x08, 0x01, 0x08, 0x02]).unwrap(),
            ServingStatus::NotServing
        );
    }

    #[test]
    fn truncated_varints_are_errors() {
        assert_malformed(decode_response_frame(&frame(&[0x08]))); // no value
        assert_malformed(decode_response_frame(&frame(&[0x08, 0x80]))); // cut mid-varint
        assert_malformed(decode_response_frame(&frame(&[0x96]))); // cut mid-key
        assert_malformed(decode_response(&[0x22, 0x80])); // cut length
        // Eleven continuation bytes: longer than any u64.
        assert_malformed(decode_response(&[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ]));
        assert_malformed(decode_response(&[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
        ]));
    }

    #[test]
    fn truncated_fields_are_errors() {
        assert_malformed(decode_response(&[0x22, 0x05, b'a'])); // 5 bytes promised, 1 given
        assert_malformed(decode_response(&[0x19, 1, 2, 3])); // fixed64 cut short
        assert_malformed(decode_response(&[0x2d, 1, 2])); // fixed32 cut short
        // A huge length must not overflow the bounds arithmetic.
        assert_malformed(decode_response(&[
            0x22, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ]));
    }

    #[test]
    fn bad_keys_and_wire_types_are_errors() {
        assert_malformed(decode_response(&[0x00, 0x01])); // field number 0
        assert_malformed(decode_response(&[0x0a, 0x01, 0x01])); // status as bytes
        assert_malformed(decode_response(&[0x13])); // field 2, start group
        assert_malformed(decode_response(&[0x16])); // field 2, wire type 6
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_malformed(decode_response_frame(&[])); // no message at all
        assert_malformed(decode_response_frame(&[0, 0, 0])); // cut prefix
        assert_malformed(decode_response_frame(&[0, 0, 0, 0, 5, 0x08, 0x01])); // cut message
        assert_malformed(decode_response_frame(&[0, 0, 0, 0, 2, 0x08, 0x01, 0x00])); // extra
        assert_malformed(decode_response_frame(&[1, 0, 0, 0, 2, 0x08, 0x01])); // compressed
        assert_malformed(decode_response_frame(&[7, 0, 0, 0, 2, 0x08, 0x01])); // bad flag
    }

    proptest::proptest! {
        #[test]
        fn any_varint_round_trips(value in proptest::prelude::any::<u64>()) {
            let mut out = BytesMut::new();
            encode_varint(value, &mut out);
            proptest::prop_assert_eq!(decode_varint(&out), Ok((value, out.len())));
        }
    }
}
