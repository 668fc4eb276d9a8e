//! The documentation of the configuration keys cannot drift from the keys table
//! (`src/config/keys.rs`): README.md's options table and `config/portshare.toml` list
//! exactly its keys, with its defaults.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::collections::BTreeMap;

use portshare::config::keys::{KEYS, Key, KeyDefault, markdown_table};

/// The lines around README.md's options table.
const BEGIN: &str =
    "<!-- options table: rendered from src/config/keys.rs, checked by tests/docs.rs -->";
const END: &str = "<!-- end of options table -->";

/// The README's options table, between its markers.
fn readme_table() -> &'static str {
    include_str!("../README.md")
        .split_once(BEGIN)
        .and_then(|(_, rest)| rest.split_once(END))
        .map_or("", |(table, _)| table.trim())
}

/// The keys table's keys and the text the README shows as each one's default.
fn expected_defaults() -> BTreeMap<&'static str, String> {
    KEYS.iter().map(|k| (k.name, k.shown_default())).collect()
}

#[test]
fn readme_lists_every_key_with_its_default() {
    let table = readme_table();
    assert!(
        !table.is_empty(),
        "README.md has no options table between {BEGIN:?} and {END:?}"
    );
    let mut listed = BTreeMap::new();
    // Rows after the header and its rule; a cell's own `|` is written `\|`.
    for row in table.lines().skip(2) {
        let row = row.replace("\\|", "\u{0}");
        let cells: Vec<String> = row
            .trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().replace('\u{0}', "|"))
            .collect();
        let [_, name, _, default] = cells.as_slice() else {
            panic!("README.md options row without four cells: {row:?}");
        };
        if name == "—" {
            continue; // --config, which is no key.
        }
        let name = name.trim_matches('`');
        let name = match name.strip_prefix('[').and_then(|n| n.split_once("] ")) {
            Some((table, key)) => format!("{table}.{key}"),
            None => name.to_owned(),
        };
        let default = default.replace('|', "\\|");
        assert!(
            listed.insert(name.clone(), default).is_none(),
            "README.md lists {name} twice"
        );
    }
    let expected: BTreeMap<String, String> = expected_defaults()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.replace('|', "\\|")))
        .collect();
    for (name, default) in &expected {
        match listed.get(name) {
            None => panic!("README.md's options table does not list {name}"),
            Some(shown) => assert_eq!(
                shown, default,
                "README.md gives {name} the default {shown}; the keys table says {default}"
            ),
        }
    }
    for name in listed.keys() {
        assert!(
            expected.contains_key(name),
            "README.md lists {name}, which the keys table does not have"
        );
    }
    // Flags and meanings too: the table is rendered, not written by hand.
    assert!(
        table == markdown_table().trim(),
        "README.md's options table is not the one rendered from src/config/keys.rs; it should read:\n{}",
        markdown_table()
    );
}

/// Every `key = value` of config/portshare.toml, set or commented out, by its full name.
fn example_keys() -> BTreeMap<String, toml::Value> {
    let mut keys = BTreeMap::new();
    let mut table: Option<String> = None;
    // Inside a table that is one key's value (`[workers.env]`): its lines are examples.
    let mut in_value = false;
    for line in include_str!("../config/portshare.toml").lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_value = name.contains('.');
            if in_value {
                assert!(
                    keys.insert(name.to_owned(), toml::Value::Table(Default::default()))
                        .is_none()
                );
            } else {
                table = Some(name.to_owned());
            }
            continue;
        }
        let Some((name, value)) = line.split_once(" = ") else {
            continue;
        };
        if in_value || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            continue;
        }
        let full = match &table {
            Some(t) => format!("{t}.{name}"),
            None => name.to_owned(),
        };
        let parsed: toml::Table = format!("v = {value}")
            .parse()
            .unwrap_or_else(|e| panic!("config/portshare.toml, {full}: {e}"));
        let value = parsed
            .get("v")
            .cloned()
            .unwrap_or_else(|| panic!("{full}: no value"));
        assert!(
            keys.insert(full.clone(), value).is_none(),
            "config/portshare.toml shows {full} twice"
        );
    }
    keys
}

#[test]
fn example_config_shows_every_key_with_its_default() {
    let shown = example_keys();
    for Key { name, default, .. } in KEYS {
        let Some(value) = shown.get(*name) else {
            panic!("config/portshare.toml does not show {name}");
        };
        let expected = match *default {
            KeyDefault::Text(t) => toml::Value::String(t.to_owned()),
            KeyDefault::Number(n) => toml::Value::Integer(n as i64),
            // No default: any example value does.
            KeyDefault::Unset(_) => continue,
        };
        assert_eq!(
            value, &expected,
            "config/portshare.toml gives {name} the default {value}; the keys table says {expected}"
        );
    }
    for name in shown.keys() {
        assert!(
            KEYS.iter().any(|k| k.name == name),
            "config/portshare.toml shows {name}, which the keys table does not have"
        );
    }
}
