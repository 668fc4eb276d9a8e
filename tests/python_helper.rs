//! The Python worker helper (`python/portshare`, shipped in the wheel) against its own
//! pytest suite (`python/tests`), in the test venv: real grpcio workers built on the
//! helper, signalled, health-checked and orphaned.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod support;

use std::path::Path;
use std::process::Command;

#[test]
fn python_helper_pytest_suite_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(support::python());
    cmd.args(["-m", "pytest", "-q", "python/tests"])
        .current_dir(root)
        // The checkout's helper, not an installed one; no .pyc files in the source tree.
        .env("PYTHONPATH", root.join("python"))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    // The tests set the PORTSHARE_* variables they mean; none leak in from here.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PORTSHARE_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd.output().expect("run pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "pytest python/tests failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}
