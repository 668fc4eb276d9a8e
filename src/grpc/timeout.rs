//! `grpc-timeout`: how long the caller still waits, as 1 to 8 ASCII digits and a unit
//! (`H`, `M`, `S`, `m`, `u`, `n`).

use std::time::Duration;

use hyper::header::HeaderMap;

use super::GRPC_TIMEOUT;

/// The largest value the format's 8 digits hold.
const MAX_VALUE: u128 = 99_999_999;

/// The units, finest first: nanoseconds in one, and the letter.
const UNITS: [(u128, u8); 6] = [
    (1, b'n'),
    (1_000, b'u'),
    (1_000_000, b'm'),
    (1_000_000_000, b'S'),
    (60_000_000_000, b'M'),
    (3_600_000_000_000, b'H'),
];

/// Where rounding starts: milliseconds. A deadline finer than that is noise on a network,
/// and it is what gRPC clients send themselves.
const ROUND_FROM: usize = 2;

/// A `grpc-timeout` value; `None` unless it is 1 to 8 digits and a unit.
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Eight digits always fit a u64.
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The call's deadline from its `grpc-timeout` header. A malformed value is ignored, as
/// gRPC servers do.
pub fn timeout_in(headers: &HeaderMap) -> Option<Duration> {
    parse_timeout(headers.get(&GRPC_TIMEOUT)?.as_bytes())
}

/// `left` as a `grpc-timeout` value: the shortest exact form when one fits in 8 digits,
/// otherwise rounded up (never shorter than `left`) in milliseconds, or the coarser unit
/// it takes to fit. Zero is sent as `1m`, so a spent budget never reads as already
/// expired; past what 8 digits of hours hold it is `99999999H`.
pub fn format_timeout(left: Duration) -> String {
    let nanos = left.as_nanos();
    // The coarsest unit that divides exactly gives the fewest digits.
    let exact = UNITS
        .iter()
        .rev()
        .find(|(unit, _)| nanos.is_multiple_of(*unit))
        .map(|&(unit, letter)| (nanos / unit, letter))
        .filter(|&(value, _)| value > 0 && value <= MAX_VALUE);
    let (value, letter) = exact
        .or_else(|| {
            UNITS[ROUND_FROM..]
                .iter()
                .map(|&(unit, letter)| (nanos.div_ceil(unit).max(1), letter))
                .find(|&(value, _)| value <= MAX_VALUE)
        })
        .unwrap_or((MAX_VALUE, b'H'));
    format!("{value}{}", char::from(letter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use proptest::prelude::*;

    #[test]
    fn every_unit_reads() {
        let cases = [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("1500m", Duration::from_millis(1500)),
            ("7u", Duration::from_micros(7)),
            ("99999999n", Duration::from_nanos(99_999_999)),
            ("00000001S", Duration::from_secs(1)),
            ("0m", Duration::ZERO),
            ("99999999H", Duration::from_secs(99_999_999 * 3600)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_timeout(text.as_bytes()), Some(want), "{text}");
        }
    }

    #[test]
    fn malformed_timeouts_are_ignored() {
        for bad in [
            "",
            "S",
            "10",
            "123456789S",
            "1x",
            "-1S",
            "+1S",
            "1.5S",
            " 1S",
            "1S ",
            "1s",
        ] {
            assert_eq!(parse_timeout(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn the_header_is_read_by_its_constant_name() {
        let mut h = HeaderMap::new();
        assert_eq!(timeout_in(&h), None);
        h.insert("grpc-timeout", HeaderValue::from_static("250m"));
        assert_eq!(timeout_in(&h), Some(Duration::from_millis(250)));
    }

    #[test]
    fn formats_the_shortest_exact_form() {
        assert_eq!(format_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(format_timeout(Duration::from_secs(5)), "5S");
        assert_eq!(format_timeout(Duration::from_secs(7200)), "2H");
        assert_eq!(format_timeout(Duration::from_secs(90)), "90S");
        assert_eq!(format_timeout(Duration::from_micros(1500)), "1500u");
        assert_eq!(
            format_timeout(Duration::from_nanos(99_999_999)),
            "99999999n"
        );
        assert_eq!(format_timeout(Duration::from_secs(100_000)), "100000S");
    }

    #[test]
    fn rounds_up_what_is_not_exact() {
        // 10 digits of nanoseconds: rounded up to whole milliseconds.
        assert_eq!(format_timeout(Duration::new(4, 999_876_543)), "5000m");
        assert_eq!(format_timeout(Duration::new(1, 1)), "1001m");
        // Milliseconds past 8 digits (about 27 hours): seconds.
        assert_eq!(format_timeout(Duration::new(200_000, 1)), "200001S");
        assert_eq!(format_timeout(Duration::ZERO), "1m");
        assert_eq!(format_timeout(Duration::MAX), "99999999H");
        for d in [Duration::ZERO, Duration::from_secs(1), Duration::MAX] {
            let s = format_timeout(d);
            assert!(s.len() <= 9, "{s} has more than 8 digits");
        }
    }

    /// The unit of a formatted value's last digit.
    fn unit_of(text: &str) -> Duration {
        let letter = text.as_bytes().last().copied().unwrap_or_default();
        let nanos = UNITS
            .iter()
            .find(|(_, l)| *l == letter)
            .map_or(0, |(unit, _)| *unit);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    proptest! {
        #[test]
        fn what_is_written_reads_back_never_shorter(secs in 0u64..(1 << 40), nanos in 0u32..1_000_000_000) {
            let left = Duration::new(secs, nanos);
            let text = format_timeout(left);
            let read = parse_timeout(text.as_bytes());
            prop_assert!(read.is_some(), "{} does not parse", text);
            let read = read.unwrap_or_default();
            if left <= Duration::from_secs(99_999_999 * 3600) {
                prop_assert!(read >= left, "{} is shorter than {:?}", text, left);
                prop_assert!(read - left <= unit_of(&text).max(Duration::from_millis(1)), "{} rounds {:?} too far", text, left);
            }
        }

        #[test]
        fn what_is_read_writes_back_the_same(n in 1u64..=99_999_999, unit in 0usize..6) {
            let (unit_nanos, letter) = UNITS[unit];
            let text = format!("{n}{}", char::from(letter));
            let read = parse_timeout(text.as_bytes());
            prop_assert_eq!(read.map(|d| d.as_nanos()), Some(u128::from(n) * unit_nanos));
            let again = format_timeout(read.unwrap_or_default());
            prop_assert!(again.len() <= text.len(), "{} became {}", text, again);
            prop_assert_eq!(parse_timeout(again.as_bytes()), read);
        }
    }
}
