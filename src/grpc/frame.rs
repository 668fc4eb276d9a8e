//! Message framing: every gRPC message, request or response, travels behind a 5-byte
//! prefix (a compression flag, then the length as a big-endian `u32`).

use bytes::{BufMut, Bytes, BytesMut};

use super::WireError;

/// Length of the prefix: one flag byte and a big-endian `u32` length.
pub const PREFIX_LEN: usize = 5;

/// The flag of an uncompressed message.
const UNCOMPRESSED: u8 = 0;

/// The flag of a message compressed with the call's `grpc-encoding`.
const COMPRESSED: u8 = 1;

/// `message` behind an uncompressed prefix.
pub fn encode(message: &[u8]) -> Result<Bytes, WireError> {
    let len = u32::try_from(message.len()).map_err(|_| WireError::TooLarge(message.len()))?;
    let mut out = BytesMut::with_capacity(PREFIX_LEN + message.len());
    out.put_u8(UNCOMPRESSED);
    out.put_u32(len);
    out.put_slice(message);
    Ok(out.freeze())
}

/// The message of a body that holds exactly one uncompressed message. A compressed one is
/// refused: portshare offers no `grpc-accept-encoding`, so it would be the peer's bug.
pub fn decode_one(body: &[u8]) -> Result<&[u8], WireError> {
    let malformed = WireError::Malformed;
    let (prefix, rest) = body
        .split_first_chunk::<PREFIX_LEN>()
        .ok_or_else(|| malformed("truncated gRPC message prefix".into()))?;
    let [flag, len @ ..] = *prefix;
    match flag {
        UNCOMPRESSED => {}
        COMPRESSED => {
            return Err(malformed(
                "compressed message, though no compression was offered".into(),
            ));
        }
        other => return Err(malformed(format!("gRPC message flag {other:#04x}"))),
    }
    let len = usize::try_from(u32::from_be_bytes(len))
        .map_err(|_| malformed("gRPC message length does not fit in memory".into()))?;
    match rest.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(malformed(format!(
            "truncated gRPC message: {} of {len} bytes",
            rest.len()
        ))),
        std::cmp::Ordering::Greater => Err(malformed(format!(
            "{} bytes after the gRPC message",
            rest.len() - len
        ))),
        std::cmp::Ordering::Equal => Ok(rest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn is_malformed<T: std::fmt::Debug>(r: Result<T, WireError>) -> bool {
        matches!(r, Err(WireError::Malformed(_)))
    }

    #[test]
    fn the_prefix_is_a_zero_flag_and_a_big_endian_length() {
        assert_eq!(&encode(b"").expect("a frame")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &encode(&[7; 300]).expect("a frame")[..PREFIX_LEN],
            &[0, 0, 0, 0x01, 0x2c]
        );
    }

    #[test]
    fn only_one_whole_uncompressed_message_is_read() {
        assert_eq!(decode_one(&[0, 0, 0, 0, 2, 8, 1]), Ok(&[8, 1][..]));
        assert_eq!(decode_one(&[0, 0, 0, 0, 0]), Ok(&[][..]));
        assert!(is_malformed(decode_one(&[])));
        assert!(is_malformed(decode_one(&[0, 0, 0])));
        assert!(is_malformed(decode_one(&[0, 0, 0, 0, 5, 8, 1])));
        assert!(is_malformed(decode_one(&[0, 0, 0, 0, 2, 8, 1, 0])));
        assert!(is_malformed(decode_one(&[1, 0, 0, 0, 2, 8, 1])));
        assert!(is_malformed(decode_one(&[7, 0, 0, 0, 2, 8, 1])));
    }

    proptest! {
        #[test]
        fn frames_round_trip(message in proptest::collection::vec(any::<u8>(), 0..512)) {
            let frame = encode(&message).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(frame.len(), PREFIX_LEN + message.len());
            prop_assert_eq!(decode_one(&frame), Ok(&message[..]));
        }
    }
}
