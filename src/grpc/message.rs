//! `grpc-message`: the status message, percent-encoded on the wire (UTF-8 underneath) so
//! that any text fits in a header value.

use std::borrow::Cow;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode, utf8_percent_encode};

/// What the gRPC spec has encoded: every byte outside 0x20–0x7E (the controls and DEL
/// here; bytes from 0x80 up always are) and `%` itself.
const ENCODED: &AsciiSet = &CONTROLS.add(b'%');

/// `text` as a `grpc-message` value; borrowed when nothing needed encoding.
pub fn encode_message(text: &str) -> Cow<'_, str> {
    utf8_percent_encode(text, ENCODED).into()
}

/// Decodes a `grpc-message`. Malformed escapes and bytes that are not UTF-8 are kept as
/// well as can be (the spec asks to be tolerant), since the message is only for people.
pub fn decode_message(value: &[u8]) -> String {
    percent_decode(value).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use proptest::prelude::*;

    #[test]
    fn printable_ascii_but_percent_is_left_alone() {
        assert!(matches!(
            encode_message("Method not found!"),
            Cow::Borrowed(_)
        ));
        assert_eq!(encode_message("100% sure"), "100%25 sure");
        assert_eq!(encode_message("a\tb\r\n\u{7f}"), "a%09b%0D%0A%7F");
        assert_eq!(encode_message("~ {}"), "~ {}");
    }

    #[test]
    fn non_ascii_is_encoded_as_utf8() {
        assert_eq!(encode_message("précis"), "pr%C3%A9cis");
        assert_eq!(decode_message(b"pr%C3%A9cis"), "précis");
    }

    #[test]
    fn decoding_is_tolerant() {
        assert_eq!(decode_message(b"Method not found!"), "Method not found!");
        assert_eq!(decode_message(b"h%C3%A9llo%2525"), "h\u{e9}llo%25");
        assert_eq!(decode_message(b"bad %zz and %4"), "bad %zz and %4");
        assert_eq!(decode_message(b"%"), "%");
        assert_eq!(decode_message(b"%ff"), "\u{fffd}");
        assert_eq!(decode_message(b"lower %c3%a9"), "lower \u{e9}");
    }

    proptest! {
        #[test]
        fn any_text_round_trips_through_a_valid_header(text in any::<String>()) {
            let encoded = encode_message(&text);
            prop_assert!(encoded.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            prop_assert!(HeaderValue::from_str(&encoded).is_ok());
            prop_assert_eq!(decode_message(encoded.as_bytes()), text);
        }

        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_message(&bytes);
        }
    }
}
