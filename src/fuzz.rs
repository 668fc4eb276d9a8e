//! Entry points of the fuzz targets in `fuzz/` (`cargo fuzz`, see `fuzz/README.md`): one per
//! parser of outside input. Each takes arbitrary bytes, must not panic, and asserts what the
//! parser promises, so a broken promise is a finding as much as a crash is. The tests below
//! replay the checked-in seeds, so `cargo test` keeps every past finding fixed.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use clap::Parser;
use hyper::header::{HeaderMap, HeaderValue};

use crate::cli::Cli;
use crate::config::{self, ConfigError};
use crate::grpc::health::{self, ServingStatus};
use crate::grpc::{self, GRPC_TIMEOUT};
use crate::h2::{self, Opening, PREFACE, SNIFF_LEN};

/// Resolves `localhost` only, so that fuzzing never waits on DNS.
fn offline_lookup(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    if host.eq_ignore_ascii_case("localhost") {
        Ok(vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))])
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "not resolved while fuzzing",
        ))
    }
}

/// A configuration error is one line that names a key.
fn assert_one_line(e: &ConfigError) {
    assert!(!e.key.is_empty(), "error names no key: {e:?}");
    assert!(
        !e.key.contains('\n') && !e.problem.contains('\n'),
        "error is not one line: {e:?}"
    );
}

/// Configuration from every layer at once. The input is three parts split by lines of
/// `%%`: the TOML file, `KEY=VALUE` environment lines (`PORTSHARE_` is added to a key that
/// lacks it), and command-line arguments, one a line.
///
/// Promises: errors are one line naming a key; an accepted configuration renders (as
/// `portshare check` prints it) to TOML that is accepted again and renders the same.
/// Returns whether the configuration was accepted.
pub fn config(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, "\n%%\n");
    let toml = parts.next().unwrap_or_default();
    let env: HashMap<String, String> = parts
        .next()
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| {
            let key = if k.starts_with("PORTSHARE_") {
                k.to_owned()
            } else {
                format!("PORTSHARE_{k}")
            };
            (key, v.to_owned())
        })
        .collect();
    let args = std::iter::once("portshare").chain(parts.next().unwrap_or_default().lines());
    // clap's own errors are clap's: it prints usage and exits 2.
    let Ok(cli) = Cli::try_parse_from(args) else {
        return false;
    };
    let mut opts = cli.opts;
    // The TOML comes from the input, not from a file.
    opts.config = None;
    let accepted = match config::raw_from_toml(toml, &opts, &env)
        .and_then(|raw| raw.validate_with(offline_lookup))
    {
        Ok(c) => c,
        Err(e) => {
            assert_one_line(&e);
            return false;
        }
    };
    let rendered = accepted.to_toml();
    let again = config::raw_from_toml(&rendered, &crate::cli::Opts::default(), &HashMap::new())
        .and_then(|raw| raw.validate_with(offline_lookup))
        .unwrap_or_else(|e| panic!("rendered configuration refused: {e}\n{rendered}"));
    assert_eq!(again.to_toml(), rendered, "rendering is not stable");
    true
}

/// The health check's decoding of what a backend answers: the gRPC frame around a
/// `HealthCheckResponse`, `grpc-status`, and the percent-encoded `grpc-message`.
///
/// Promises: nothing panics; a status written the way protobuf writes it reads back (also
/// after fields a newer schema adds); `grpc-status` is taken only as plain digits; the
/// message decodes what the proxy's own encoder wrote.
pub fn health_response(data: &[u8]) {
    let _ = health::decode_response_frame(data);
    let _ = health::decode_response(data);

    // A status field after whatever unknown fields the input starts with.
    if let Some((head, tail)) = data.split_first_chunk::<4>() {
        let status = i32::from_le_bytes(*head);
        let mut message = BytesMut::new();
        // Field 1, varint: negative enums are sign-extended to ten bytes.
        message.extend_from_slice(&[0x08]);
        health::encode_varint(i64::from(status) as u64, &mut message);
        let expected = ServingStatus::from_wire(status);
        assert_eq!(health::decode_response(&message).ok(), Some(expected));
        // Unknown field 2, length-delimited, carrying the rest of the input.
        let mut longer = message.clone();
        longer.extend_from_slice(&[0x12]);
        health::encode_varint(tail.len() as u64, &mut longer);
        longer.extend_from_slice(tail);
        assert_eq!(health::decode_response(&longer).ok(), Some(expected));
        // Framed: flag 0, length, message.
        let mut frame = BytesMut::new();
        frame.extend_from_slice(&[0]);
        frame.extend_from_slice(&(longer.len() as u32).to_be_bytes());
        frame.extend_from_slice(&longer);
        assert_eq!(health::decode_response_frame(&frame).ok(), Some(expected));
        // One byte short, or one too many: refused.
        assert!(health::decode_response_frame(&frame[..frame.len() - 1]).is_err());
        frame.extend_from_slice(&[0]);
        assert!(health::decode_response_frame(&frame).is_err());
    }

    if let Ok(code) = grpc::parse_status(data) {
        assert!(!data.is_empty() && data.iter().all(u8::is_ascii_digit));
        let digits = std::str::from_utf8(data).unwrap_or_default();
        assert_eq!(digits.trim_start_matches('0').parse().unwrap_or(0u32), code);
    }

    let _ = grpc::decode_message(data);
    let text = String::from_utf8_lossy(data);
    let encoded = grpc::encode_message(&text);
    assert!(HeaderValue::from_str(&encoded).is_ok(), "{encoded:?}");
    assert_eq!(grpc::decode_message(encoded.as_bytes()), text);

    if let Ok(frame) = health::encode_request_frame(&text) {
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]);
        assert_eq!(frame[0], 0);
        assert_eq!(len as usize, frame.len() - 5);
    }
}

/// What `grpc-timeout` means, written out longhand: `None` unless 1 to 8 digits and a unit.
fn reference_timeout(text: &[u8]) -> Option<u128> {
    let (unit, digits) = text.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u128, |n, d| n * 10 + u128::from(d - b'0'));
    let unit_nanos: u128 = match unit {
        b'H' => 3_600_000_000_000,
        b'M' => 60_000_000_000,
        b'S' => 1_000_000_000,
        b'm' => 1_000_000,
        b'u' => 1_000,
        b'n' => 1,
        _ => return None,
    };
    Some(n * unit_nanos)
}

/// The `grpc-timeout` header, both ways.
///
/// Promises: the proxy reads exactly what the gRPC spec allows, to the nanosecond; what the
/// health check writes is valid, never shorter than the time left, and rounds up by at most
/// one unit of its last digit (exact when it does not round).
pub fn grpc_timeout(data: &[u8]) {
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_TIMEOUT, value);
        assert_eq!(
            grpc::timeout_in(&headers).map(|d| d.as_nanos()),
            reference_timeout(data),
            "{:?}",
            String::from_utf8_lossy(data)
        );
    }

    let Some((secs, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let nanos = rest
        .first_chunk::<4>()
        .map_or(0, |n| u32::from_le_bytes(*n) % 1_000_000_000);
    // Up to about 30 years, which the format can say; beyond that it says its maximum.
    let left = Duration::new(u64::from_le_bytes(*secs) % (1 << 30), nanos);
    let text = grpc::format_timeout(left);
    assert!(HeaderValue::from_str(&text).is_ok(), "{text:?}");
    let read =
        grpc::parse_timeout(text.as_bytes()).unwrap_or_else(|| panic!("{text:?} does not parse"));
    assert!(read >= left, "{text:?} is shorter than {left:?}");
    let unit = match text.as_bytes().last() {
        Some(b'n') => Duration::from_nanos(1),
        Some(b'u') => Duration::from_micros(1),
        Some(b'm') => Duration::from_millis(1),
        Some(b'S') => Duration::from_secs(1),
        Some(b'M') => Duration::from_secs(60),
        _ => Duration::from_secs(3600),
    };
    assert!(read - left <= unit, "{text:?} rounds {left:?} up too far");
}

/// The h2 listener's look at a connection's first bytes.
///
/// Promises: undecided only while fewer than [`SNIFF_LEN`] bytes are in; once decided, more
/// bytes never change the answer (the listener peeks as bytes arrive); the HTTP/2 preface
/// is always HTTP/2.
pub fn sniff(data: &[u8]) {
    let mut decided: Option<Opening> = None;
    for end in 0..=data.len() {
        match (h2::classify(&data[..end]), decided) {
            (None, None) => assert!(end < SNIFF_LEN),
            (None, Some(before)) => panic!("decided {before:?}, then undecided at {end}"),
            (Some(now), Some(before)) => assert_eq!(now, before, "changed at byte {end}"),
            (Some(now), None) => decided = Some(now),
        }
    }
    if data.starts_with(&PREFACE[..SNIFF_LEN]) {
        assert_eq!(decided, Some(Opening::Http2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    type Target = fn(&[u8]);

    const TARGETS: [(&str, Target); 4] = [
        ("config", |data| {
            config(data);
        }),
        ("health_response", health_response),
        ("grpc_timeout", grpc_timeout),
        ("sniff", sniff),
    ];

    /// The checked-in inputs of one target: seeds and fixed findings.
    fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds")
            .join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut out: Vec<_> = entries
            .map(|e| {
                let path = e.expect("a readable seed directory").path();
                let bytes = std::fs::read(&path).expect("a readable seed");
                (path, bytes)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn every_seed_keeps_every_promise() {
        for (target, run) in TARGETS {
            let inputs = seeds(target);
            assert!(inputs.len() >= 3, "{target} has too few seeds");
            for (path, bytes) in inputs {
                eprintln!("{}", path.display());
                run(&bytes);
            }
        }
    }

    /// A few thousand cheap mutations of the seeds, so that the promises are exercised
    /// on every `cargo test`, not only where cargo fuzz runs.
    #[test]
    fn mutated_seeds_keep_every_promise() {
        let mut rng = fastrand::Rng::with_seed(7);
        for (target, run) in TARGETS {
            let inputs = seeds(target);
            for _ in 0..500 {
                let mut bytes = inputs[rng.usize(..inputs.len())].1.clone();
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(..=bytes.len());
                    match rng.u8(..3) {
                        0 if at < bytes.len() => bytes[at] = rng.u8(..),
                        1 if at < bytes.len() => {
                            bytes.remove(at);
                        }
                        _ => bytes.insert(at, rng.u8(..)),
                    }
                }
                run(&bytes);
            }
        }
    }

    #[test]
    fn config_seeds_reach_the_round_trip() {
        let accepted = seeds("config")
            .iter()
            .filter(|(_, bytes)| config(bytes))
            .count();
        assert!(accepted >= 3, "only {accepted} config seeds are accepted");
    }

    #[test]
    fn the_config_target_sees_every_layer() {
        // A flag overrides the environment, which overrides the file.
        let input = b"listen = \"127.0.0.1:1\"\nbackends = [\"localhost:2\"]\n%%\nLISTEN=127.0.0.1:3\n%%\n--listen\n127.0.0.1:4\n";
        assert!(config(input));
        let env = HashMap::from([("PORTSHARE_LISTEN".to_owned(), "127.0.0.1:3".to_owned())]);
        let opts = Cli::try_parse_from(["portshare", "--listen", "127.0.0.1:4"])
            .expect("valid flags")
            .opts;
        let c = config::raw_from_toml(
            "listen = \"127.0.0.1:1\"\nbackends = [\"localhost:2\"]\n",
            &opts,
            &env,
        )
        .and_then(|raw| raw.validate_with(offline_lookup))
        .expect("a valid configuration");
        assert_eq!(c.listener.addr, SocketAddr::from(([127, 0, 0, 1], 4)));
        assert_eq!(
            c.backends[0].addr,
            SocketAddr::from(([127, 0, 0, 1], 2)).into()
        );
    }

    #[test]
    fn the_reference_timeout_reads_the_spec() {
        assert_eq!(reference_timeout(b"10S"), Some(10_000_000_000));
        assert_eq!(
            reference_timeout(b"99999999H"),
            Some(99_999_999 * 3_600_000_000_000)
        );
        assert_eq!(reference_timeout(b"123456789m"), None);
        assert_eq!(reference_timeout(b"S"), None);
        assert_eq!(reference_timeout(b"+1S"), None);
    }
}
