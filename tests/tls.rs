//! TLS termination with real grpcio clients (ssl_channel_credentials) against a CA and
//! certificates made in the test, in both modes.

// A test stops at what it did not expect (unwrap/expect), and times real processes by the
// wall clock: the library's lints against both (Cargo.toml, clippy.toml) are not meant here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

#[macro_use]
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use support::{Proxy, Worker, client, eventually, run_portshare};

/// A CA that can sign leaf certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).expect("self-signed CA").pem();
    Ca {
        issuer: Issuer::new(params, key),
        pem,
    }
}

/// A leaf certificate for `localhost` (server or client use), as (cert PEM, key PEM).
fn leaf(ca: &Ca, name: &str) -> (String, String) {
    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, &ca.issuer).expect("signed leaf");
    (cert.pem(), key.serialize_pem())
}

/// Files for one test.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Writes `text` to `name` atomically (write, then rename), as a certificate rotation would.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        path
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn start(mode: &str, worker: &Worker, tls: &[&str], env: &[(&str, &str)]) -> Proxy {
    let addr = worker.addr();
    let mut args = vec!["--mode", mode, "--backend", &addr];
    args.extend_from_slice(tls);
    Proxy::start_env(&args, env)
}

fn call(proxy: &Proxy, tls: &[&str]) -> serde_json::Value {
    let target = proxy.target();
    let mut args = vec!["unary", "--target", &target, "--timeout", "5"];
    args.extend_from_slice(tls);
    client(&args)
}

fn a_tls_client_is_served(mode: &str) {
    let worker = Worker::start_many(&["tls"]);
    let pki = Pki::new();
    let ca1 = ca("test CA");
    let (cert, key) = leaf(&ca1, "portshare");
    let (ca_pem, cert, key) = (
        pki.write("ca.pem", &ca1.pem),
        pki.write("cert.pem", &cert),
        pki.write("key.pem", &key),
    );
    let proxy = start(
        mode,
        &worker[0],
        &["--tls-cert", &s(&cert), "--tls-key", &s(&key)],
        &[],
    );
    let r = call(&proxy, &["--ca", &s(&ca_pem)]);
    assert_eq!(r["code"], "OK", "{r}");
    assert_eq!(r["worker"], "tls", "{r}");
    // A plaintext client on the TLS port fails cleanly, and the next TLS call is fine.
    let r = call(&proxy, &[]);
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
    let r = call(&proxy, &["--ca", &s(&ca_pem)]);
    assert_eq!(r["code"], "OK", "{r}");
    assert!(proxy.metric("portshare_tls_handshake_errors_total{reason=\"not_tls\"}") >= 1.0);
}

fn client_certificates_are_required_with_a_client_ca(mode: &str) {
    let worker = Worker::start_many(&["mtls"]);
    let pki = Pki::new();
    let ca1 = ca("server and client CA");
    let stranger = ca("some other CA");
    let (server_cert, server_key) = leaf(&ca1, "portshare");
    let (good_cert, good_key) = leaf(&ca1, "good client");
    let (bad_cert, bad_key) = leaf(&stranger, "foreign client");
    let ca_pem = pki.write("ca.pem", &ca1.pem);
    let files = [
        pki.write("server.pem", &server_cert),
        pki.write("server.key", &server_key),
        pki.write("good.pem", &good_cert),
        pki.write("good.key", &good_key),
        pki.write("bad.pem", &bad_cert),
        pki.write("bad.key", &bad_key),
    ];
    let [
        server_cert,
        server_key,
        good_cert,
        good_key,
        bad_cert,
        bad_key,
    ] = files.map(|p| s(&p));
    let proxy = start(
        mode,
        &worker[0],
        &[
            "--tls-cert",
            &server_cert,
            "--tls-key",
            &server_key,
            "--tls-client-ca",
            &s(&ca_pem),
        ],
        &[],
    );
    let trust = s(&ca_pem);
    let r = call(
        &proxy,
        &["--ca", &trust, "--cert", &good_cert, "--key", &good_key],
    );
    assert_eq!(r["code"], "OK", "good client: {r}");
    let r = call(&proxy, &["--ca", &trust]);
    assert_eq!(r["code"], "UNAVAILABLE", "no client certificate: {r}");
    let r = call(
        &proxy,
        &["--ca", &trust, "--cert", &bad_cert, "--key", &bad_key],
    );
    assert_eq!(r["code"], "UNAVAILABLE", "foreign client certificate: {r}");
    assert!(
        proxy.metric("portshare_tls_handshake_errors_total{reason=\"no_client_certificate\"}")
            >= 1.0
    );
    assert!(
        proxy.metric("portshare_tls_handshake_errors_total{reason=\"bad_client_certificate\"}")
            >= 1.0
    );
    let r = call(
        &proxy,
        &["--ca", &trust, "--cert", &good_cert, "--key", &good_key],
    );
    assert_eq!(r["code"], "OK", "good client again: {r}");
}

/// A certificate replaced on disk is served to the next connection (file watch), and
/// SIGHUP reloads at once; a reload with bad files keeps the old certificate.
fn certificates_rotate_without_a_restart(mode: &str) {
    let worker = Worker::start_many(&["rot"]);
    let pki = Pki::new();
    let (old_ca, new_ca) = (ca("old CA"), ca("new CA"));
    let (old_cert, old_key) = leaf(&old_ca, "old");
    let (new_cert, new_key) = leaf(&new_ca, "new");
    let (cert, key) = (
        pki.write("cert.pem", &old_cert),
        pki.write("key.pem", &old_key),
    );
    let (old_trust, new_trust) = (
        s(&pki.write("old-ca.pem", &old_ca.pem)),
        s(&pki.write("new-ca.pem", &new_ca.pem)),
    );
    let proxy = start(
        mode,
        &worker[0],
        &["--tls-cert", &s(&cert), "--tls-key", &s(&key)],
        &[("PORTSHARE_TLS__WATCH_INTERVAL", "200ms")],
    );
    assert_eq!(call(&proxy, &["--ca", &old_trust])["code"], "OK");
    assert_eq!(call(&proxy, &["--ca", &new_trust])["code"], "UNAVAILABLE");

    // Rotation by the files changing (key first, then certificate, as tools do).
    pki.write("key.pem", &new_key);
    pki.write("cert.pem", &new_cert);
    eventually(
        Duration::from_secs(20),
        "the new certificate is served",
        || call(&proxy, &["--ca", &new_trust])["code"] == "OK",
    );

    // Bad files: the reload fails loudly and the current certificate stays.
    pki.write("cert.pem", "this is not a certificate");
    eventually(
        Duration::from_secs(20),
        "the failed reload is logged",
        || proxy.log.contains("TLS reload failed"),
    );
    assert_eq!(call(&proxy, &["--ca", &new_trust])["code"], "OK");

    // Back to the old pair, reloaded by SIGHUP.
    #[cfg(unix)]
    {
        pki.write("key.pem", &old_key);
        pki.write("cert.pem", &old_cert);
        support::signal(proxy.pid(), "HUP");
        eventually(Duration::from_secs(20), "SIGHUP reloads", || {
            call(&proxy, &["--ca", &old_trust])["code"] == "OK"
        });
    }
}

in_both_modes!(
    a_tls_client_is_served,
    client_certificates_are_required_with_a_client_ca,
    certificates_rotate_without_a_restart,
);

#[test]
fn bad_tls_files_at_start_are_a_configuration_error() {
    let pki = Pki::new();
    let ca1 = ca("CA");
    let (cert, key) = leaf(&ca1, "a");
    let (_, other_key) = leaf(&ca1, "b");
    let cert = s(&pki.write("cert.pem", &cert));
    let key = s(&pki.write("key.pem", &key));
    let other_key = s(&pki.write("other.key", &other_key));
    let junk = s(&pki.write("junk.pem", "hello"));
    let missing = s(&pki.dir.path().join("missing.pem"));
    let cases: [(&str, &str, Option<&str>, &str); 5] = [
        (&missing, &key, None, "tls.cert"),
        (&junk, &key, None, "tls.cert"),
        (&cert, &junk, None, "tls.key"),
        (&cert, &other_key, None, "tls.key"),
        (&cert, &key, Some(&junk), "tls.client_ca"),
    ];
    for (c, k, ca_file, named) in cases {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:9",
            "--tls-cert",
            c,
            "--tls-key",
            k,
        ];
        if let Some(ca_file) = ca_file {
            args.extend(["--tls-client-ca", ca_file]);
        }
        let (code, _, err) = run_portshare(&args, &[]);
        assert_eq!(code, Some(64), "{named}: {err}");
        // `check` finds the same problem without starting.
        let mut checked = vec!["check"];
        checked.extend(&args);
        let (code, _, err) = run_portshare(&checked, &[]);
        assert_eq!(code, Some(64), "check, {named}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.contains(named), "{named}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, _, err) = run_portshare(&["--backend", "127.0.0.1:9", "--tls-cert", &cert], &[]);
    assert_eq!(code, Some(64));
    assert!(err.contains("tls.key"), "{err}");
}

/// PKCS#8, PKCS#1 (RSA) and SEC1 (EC) keys all load (converted with the openssl CLI).
#[cfg(unix)]
#[test]
fn every_private_key_format_loads() {
    use std::process::Command;
    let pki = Pki::new();
    let dir = pki.dir.path();
    let run = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "openssl {args:?}");
    };
    // An RSA key in PKCS#1 and an EC key in SEC1, each with a self-signed certificate.
    run(&["genrsa", "-traditional", "-out", "rsa.key", "2048"]);
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "ec.key",
    ]);
    run(&[
        "pkcs8", "-topk8", "-nocrypt", "-in", "ec.key", "-out", "ec8.key",
    ]);
    for key in ["rsa.key", "ec.key", "ec8.key"] {
        let cert = format!("{key}.crt");
        run(&[
            "req",
            "-new",
            "-x509",
            "-key",
            key,
            "-out",
            &cert,
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ]);
        let text = std::fs::read_to_string(dir.join(key)).expect("key");
        let expected = match key {
            "rsa.key" => "BEGIN RSA PRIVATE KEY",
            "ec.key" => "BEGIN EC PRIVATE KEY",
            _ => "BEGIN PRIVATE KEY",
        };
        assert!(
            text.contains(expected),
            "{key} is not in the format under test"
        );
        let (code, _, err) = run_portshare(
            &[
                "check",
                "--backend",
                "127.0.0.1:9",
                "--tls-cert",
                &s(&dir.join(&cert)),
                "--tls-key",
                &s(&dir.join(key)),
            ],
            &[],
        );
        assert_eq!(code, Some(0), "{key}: {err}");
        // check only validates the keys' names; serving loads the files.
        let proxy = Proxy::start(&[
            "--backend",
            "127.0.0.1:9",
            "--tls-cert",
            &s(&dir.join(&cert)),
            "--tls-key",
            &s(&dir.join(key)),
        ]);
        drop(proxy);
    }
}

/// A client that connects and never finishes its handshake (slowloris) is cut off at the
/// handshake timeout, and others are served meanwhile.
#[test]
fn a_stalled_handshake_is_cut_off() {
    use std::io::Read;
    let worker = Worker::start_many(&["slow"]);
    let pki = Pki::new();
    let ca1 = ca("CA");
    let (cert, key) = leaf(&ca1, "portshare");
    let (ca_pem, cert, key) = (
        pki.write("ca.pem", &ca1.pem),
        pki.write("cert.pem", &cert),
        pki.write("key.pem", &key),
    );
    let proxy = start(
        "l4",
        &worker[0],
        &["--tls-cert", &s(&cert), "--tls-key", &s(&key)],
        &[("PORTSHARE_TLS__HANDSHAKE_TIMEOUT", "300ms")],
    );
    let mut stalled = std::net::TcpStream::connect(proxy.addr).expect("connect");
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(call(&proxy, &["--ca", &s(&ca_pem)])["code"], "OK");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not cut off: {:?}",
        started.elapsed()
    );
    eventually(Duration::from_secs(5), "the timeout is counted", || {
        proxy
            .try_metric("portshare_tls_handshake_errors_total{reason=\"timeout\"}")
            .is_some_and(|n| n >= 1.0)
    });
}
