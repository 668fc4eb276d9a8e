//! The value types of the configuration keys, each read and written by serde: durations
//! (`500ms`), percentages (`10%`), sizes (`512MiB`) and words from a fixed set (`l4`, `h2`).
//! Reading one is the only parsing of its text, for the file, the environment, the flags
//! and the defaults alike; writing one renders it so that it reads back to itself, which is
//! what `portshare check` prints. An error says what is wrong with the text; the layering
//! puts the key in front of it.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use crate::balance::Balance;
use crate::supervisor::WorkerOutput;

/// Reads the text of a value (the environment and the `config` crate give numbers as text
/// too) and parses it with `parse`, whose error becomes serde's.
fn from_text<'de, D, T>(d: D, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let text = String::deserialize(d)?;
    parse(&text).map_err(de::Error::custom)
}

/// A duration as people write it: `500ms`, `30s`, `1h`, `1m 30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Human(pub Duration);

impl Human {
    /// Reads `text` as humantime does, spaces around it ignored.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        humantime::parse_duration(text)
            .map(Human)
            .map_err(|e| format!("{text:?} is not a duration like 500ms or 30s ({e})"))
    }
}

impl<'de> Deserialize<'de> for Human {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, Human::parse)
    }
}

impl Serialize for Human {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

/// A percentage such as `10%` (the `%` may be left out), kept as written (10.0 for `10%`)
/// so that `check` renders exactly what it read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(pub f64);

impl Percent {
    /// Reads a percentage from 0% to 100%.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text.strip_suffix('%').unwrap_or(text).trim().parse::<f64>() {
            Ok(p) if (0.0..=100.0).contains(&p) => Ok(Percent(p)),
            _ => Err(format!("{text:?} is not a percentage from 0% to 100%")),
        }
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, Percent::parse)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}%", self.0))
    }
}

/// A size in bytes, written `512MiB`, `2GiB`, `300MB` or `1048576`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    /// The units a size may end in, binary and decimal; a bare number is bytes.
    const UNITS: [(&str, u64); 9] = [
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("TiB", 1 << 40),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("TB", 1_000_000_000_000),
        ("B", 1),
    ];

    /// Reads a size; fractions are allowed (`1.5 KiB`), negative ones and overflow are not.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = || format!("{text:?} is not a size like 512MiB, 2GiB or 300MB");
        let (number, unit) = Self::UNITS
            .iter()
            .find_map(|(name, factor)| text.strip_suffix(name).map(|n| (n.trim(), *factor)))
            .unwrap_or((text, 1));
        let n: f64 = number.parse().map_err(|_| bad())?;
        if !n.is_finite() || n < 0.0 {
            return Err(bad());
        }
        let total = n * unit as f64;
        if total > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(Size(total as u64))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, Size::parse)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}B", self.0))
    }
}

/// A type whose values are written as one word from a fixed set (`mode = "h2"`).
pub trait Keyword: Sized + Copy + PartialEq + 'static {
    /// What the word names, for errors: "unknown *mode* ...".
    const WHAT: &'static str;
    /// Every value, in the order an error lists them.
    const ALL: &'static [Self];
    /// The word for `self`.
    fn word(self) -> &'static str;

    /// The value `text` names, or an error listing the words there are.
    fn from_word(text: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|v| v.word() == text)
            .ok_or_else(|| {
                let words: Vec<&str> = Self::ALL.iter().map(|v| v.word()).collect();
                let expected = match words.split_last() {
                    Some((last, [])) => (*last).to_owned(),
                    Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                    None => String::new(),
                };
                format!("unknown {} {text:?} (expected {expected})", Self::WHAT)
            })
    }
}

/// A [`Keyword`] as it is read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Word<T>(pub T);

impl<'de, T: Keyword> Deserialize<'de> for Word<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, |text| T::from_word(text).map(Word))
    }
}

impl<T: Keyword> Serialize for Word<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.word())
    }
}

/// Declares an enum whose values are written as words, once: each variant with its word,
/// and what the words name (for errors). The enum, its [`Keyword`] impl and `Display`
/// (the word) follow from that one list.
macro_rules! keyword_enum {
    (
        $(#[$attr:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $( $(#[$variant_attr:meta])* $variant:ident = $word:literal, )+
        }
    ) => {
        $(#[$attr])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name {
            $( $(#[$variant_attr])* $variant, )+
        }

        impl Keyword for $name {
            const WHAT: &'static str = $what;
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn word(self) -> &'static str {
                match self {
                    $($name::$variant => $word,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.word())
            }
        }
    };
}

/// [`Keyword`] for an enum declared in its own module with its words (`as_str`): every
/// variant is listed once here, and a match on all of them makes the compiler say so when
/// one is added there and not here.
macro_rules! keyword_of {
    ($name:ident ($what:literal): $($variant:ident),+ $(,)?) => {
        impl Keyword for $name {
            const WHAT: &'static str = $what;
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn word(self) -> &'static str {
                self.as_str()
            }
        }

        const _: fn($name) = |value| match value {
            $($name::$variant)|+ => {}
        };
    };
}

keyword_enum! {
    /// How client connections are handled.
    pub enum Mode("mode") {
        /// Each client connection goes to one backend; bytes are copied both ways.
        L4 = "l4",
        /// HTTP/2 is terminated and every call is balanced on its own.
        H2 = "h2",
        /// Linux, spawned workers only: the workers share the public port with SO_REUSEPORT
        /// and the kernel spreads the connections; portshare supervises and checks them.
        Reuseport = "reuseport",
    }
}

keyword_enum! {
    /// How log lines are written.
    pub enum LogFormat("format") {
        /// For people at a terminal.
        Text = "text",
        /// One JSON object a line, for log collectors in containers.
        Json = "json",
    }
}

keyword_enum! {
    /// `[health] check`: the kind of active check, before the grpc check gets its service.
    pub enum Check("check") {
        /// A TCP connect succeeds.
        Tcp = "tcp",
        /// `grpc.health.v1.Health/Check` answers SERVING.
        Grpc = "grpc",
    }
}

keyword_of!(Balance("balance"): LeastConn, RoundRobin, P2c);

keyword_of!(WorkerOutput("output"): Prefix, Inherit);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_percentages_read_as_written() {
        assert_eq!(Size::parse("512MiB"), Ok(Size(512 << 20)));
        assert_eq!(Size::parse("2GiB"), Ok(Size(2 << 30)));
        assert_eq!(Size::parse("300MB"), Ok(Size(300_000_000)));
        assert_eq!(Size::parse("1.5 KiB"), Ok(Size(1536)));
        assert_eq!(Size::parse("4096"), Ok(Size(4096)));
        assert!(Size::parse("lots").is_err());
        assert!(Size::parse("-1MiB").is_err());
        assert_eq!(Percent::parse("25%"), Ok(Percent(25.0)));
        assert_eq!(Percent::parse("12.3%"), Ok(Percent(12.3)));
        assert_eq!(Percent::parse("0"), Ok(Percent(0.0)));
        assert!(Percent::parse("150%").is_err());
    }

    #[test]
    fn unknown_words_are_errors_that_list_the_words() {
        assert_eq!(
            Balance::from_word("random"),
            Err("unknown balance \"random\" (expected least-conn, round-robin or p2c)".into())
        );
        assert_eq!(
            Mode::from_word("l7"),
            Err("unknown mode \"l7\" (expected l4, h2 or reuseport)".into())
        );
    }

    #[test]
    fn every_word_reads_back_and_displays_as_itself() {
        fn round_trip<T: Keyword + fmt::Debug>() {
            for v in T::ALL {
                assert_eq!(T::from_word(v.word()), Ok(*v), "{v:?}");
            }
        }
        round_trip::<Mode>();
        round_trip::<LogFormat>();
        round_trip::<Check>();
        round_trip::<Balance>();
        round_trip::<WorkerOutput>();
        assert_eq!(Mode::H2.to_string(), "h2");
        assert_eq!(Check::Grpc.word(), "grpc");
        assert_eq!(LogFormat::ALL, [LogFormat::Text, LogFormat::Json]);
    }

    #[test]
    fn durations_read_with_spaces_around() {
        assert_eq!(Human::parse(" 2s "), Ok(Human(Duration::from_secs(2))));
        assert!(Human::parse("soon").is_err_and(|e| e.contains("500ms")));
    }
}
