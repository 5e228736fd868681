//! The upload's side of the trust boundary: credentials are refused in the URL (argv, the
//! config file) and never reach stderr, `status`, a flush receipt or a record; the upload
//! trusts the operator's private CA when told to (and only then), and presents a client
//! certificate to a collector that requires one. The collector is a real HTTPS server on
//! 127.0.0.1 (rustls) with a PKI the test makes with `openssl`.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sockacct_tests::{tls::TestPki, *};

/// Writes `text` as `name` in `dir`, readable by root only.
fn write_private(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Runs the agent binary with `args` for at most 30 s (an agent that accepted what it
/// should refuse would run on: it is killed, and counts as accepted); (exited with
/// success or was still running, stdout + stderr).
fn run_agent(args: &[&str]) -> (bool, String) {
    let out = TempDir::new("agent-out");
    let (o, e) = (out.0.join("out"), out.0.join("err"));
    let mut child = Command::new(agent_exe())
        .args(args)
        .stdout(fs::File::create(&o).unwrap())
        .stderr(fs::File::create(&e).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ok = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        fs::read_to_string(&o).unwrap_or_default(),
        fs::read_to_string(&e).unwrap_or_default()
    );
    (ok, text)
}

/// Every record the spool in `dir` holds, decoded, plus the raw bytes of every other file.
fn spool_text(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let raw = fs::read(&p).unwrap_or_default();
            match zstd::stream::decode_all(&raw[..]) {
                Ok(text) => out.push_str(&String::from_utf8_lossy(&text)),
                Err(_) => out.push_str(&String::from_utf8_lossy(&raw)),
            }
        }
    }
    out
}

#[test]
fn credentials_in_the_upload_url_are_refused_and_never_echoed() {
    // Refused while the settings are read, before anything needs root.
    let dir = TempDir::new("creds");
    let d = dir.0.display().to_string();
    let in_file = write_private(
        &dir.0,
        "with-password.toml",
        "[upload]\nurl = \"https://u:secret@127.0.0.1:1/ingest\"\n",
    );
    let in_query = write_private(
        &dir.0,
        "with-query.toml",
        "[upload]\nformat = \"clickhouse\"\nurl = \"https://127.0.0.1:1/?user=u&password=secret\"\n",
    );
    let common = [
        "--state-dir",
        &d,
        "--spool-dir",
        &format!("{d}/spool"),
        "--control-socket",
        &format!("{d}/control.sock"),
    ];
    let cases: Vec<Vec<&str>> = vec![
        vec!["run", "--upload-url", "https://u:secret@127.0.0.1:1/"],
        vec![
            "run",
            "--upload-url",
            "https://127.0.0.1:1/?password=secret",
        ],
        vec!["run", "--config", in_file.to_str().unwrap()],
        vec!["check", "--config", in_file.to_str().unwrap()],
        vec!["run", "--config", in_query.to_str().unwrap()],
    ];
    for case in cases {
        let mut args = case.clone();
        if case[0] == "run" {
            args.extend(common);
        }
        let (ok, out) = run_agent(&args);
        eprintln!("{out}");
        assert!(!ok, "{case:?} was accepted: {out}");
        assert!(
            out.contains("upload.url") && out.contains("refused"),
            "{case:?}: {out}"
        );
        assert!(
            out.contains("token_file") && out.contains("password_file"),
            "{case:?} does not say what to do instead: {out}"
        );
        assert!(
            !out.contains("secret"),
            "{case:?} echoed the password: {out}"
        );
    }
    assert!(
        !dir.0.join("spool").exists(),
        "a refused start created nothing"
    );
}

#[test]
fn bad_tls_files_are_refused_at_start_naming_the_key() {
    // `check` builds the uploader (reading every TLS file) before touching the kernel.
    let pki = TestPki::new();
    let dir = &pki.dir.0;
    let p = |p: &Path| p.display().to_string();
    let junk = write_private(
        dir,
        "junk.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let encrypted = dir.join("encrypted.key");
    let o = Command::new("openssl")
        .args(["pkey", "-aes256", "-passout", "pass:x", "-in"])
        .arg(&pki.client_key)
        .arg("-out")
        .arg(&encrypted)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let missing = dir.join("missing.pem");
    let missing_shown = p(&missing);
    let client = |cert: &Path, key: &Path| {
        format!(
            "ca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            p(&pki.ca),
            p(cert),
            p(key)
        )
    };
    let cases = [
        (
            format!("ca_file = \"{}\"\n", p(&missing)),
            vec!["upload.ca_file", &missing_shown, "No such file"],
        ),
        (
            format!("ca_file = \"{}\"\n", p(&pki.client_key)),
            vec!["upload.ca_file", "holds no certificate"],
        ),
        (
            format!("ca_file = \"{}\"\n", p(&junk)),
            vec![
                "upload.ca_file",
                "certificate 1 of 1 is not a usable CA certificate",
            ],
        ),
        (
            client(&pki.client_cert, &pki.stranger_key),
            vec![
                "upload.client_key_file",
                "is not the private key of the certificate",
            ],
        ),
        (
            client(&pki.client_cert, &pki.ca),
            vec!["upload.client_key_file", "holds no private key"],
        ),
        (
            client(&pki.client_cert, &encrypted),
            vec!["upload.client_key_file", "is encrypted"],
        ),
        (
            client(&pki.client_key, &pki.client_key),
            vec!["upload.client_cert_file", "holds no certificate"],
        ),
        (
            format!("client_cert_file = \"{}\"\n", p(&pki.client_cert)),
            vec!["upload.client_cert_file", "needs [upload] client_key_file"],
        ),
    ];
    for (i, (extra, needles)) in cases.iter().enumerate() {
        let cfg = write_private(
            dir,
            &format!("case{i}.toml"),
            &format!("[upload]\nurl = \"https://127.0.0.1:1/\"\n{extra}"),
        );
        let (ok, out) = run_agent(&["check", "--config", cfg.to_str().unwrap()]);
        eprintln!("{out}");
        assert!(!ok, "{extra} was accepted: {out}");
        for n in needles {
            assert!(out.contains(n), "{extra}: no {n:?} in: {out}");
        }
    }
    let cfg = write_private(
        dir,
        "plain.toml",
        &format!(
            "[upload]\nurl = \"http://127.0.0.1:1/\"\nca_file = \"{}\"\n",
            p(&pki.ca)
        ),
    );
    let (ok, out) = run_agent(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && out.contains("plain http"), "{out}");
}

/// An agent whose `[upload]` section is `upload`, in a directory the test keeps (to read
/// its spool after it stopped).
struct Agent {
    d: Daemon,
    dir: TempDir,
    _cg: TestCgroup,
}

fn agent(tag: &str, upload: &str) -> Agent {
    let dir = TempDir::new(tag);
    let cfg = write_private(&dir.0, "config.toml", &format!("[upload]\n{upload}"));
    let cg = TestCgroup::new(tag);
    let d = Daemon::start_in(
        &cg,
        &dir.0,
        &["--config", cfg.to_str().unwrap(), "--interval", "50"],
    );
    Agent { d, dir, _cg: cg }
}

impl Agent {
    /// `sockacct flush`: (exit code, the receipt, stdout + stderr, how long it took).
    fn flush(&self) -> (i32, Value, String, Duration) {
        let started = Instant::now();
        let (code, out, err) = self.d.cli(&["flush"]);
        let took = started.elapsed();
        let receipt = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("flush printed no receipt ({e}): {out} {err}"));
        (code, receipt, format!("{out}{err}"), took)
    }

    /// Stops the agent; asserts `secret` is nowhere in what it said, its status, what it
    /// wrote or its spool.
    fn stop_and_check_hidden(self, secret: &str, said: &str) {
        let status = self.d.control(json!({"cmd": "status"})).to_string();
        assert!(!status.contains(secret), "status shows it: {status}");
        let stderr = self.d.stderr().join("\n");
        let lines = self.d.stop_lines().join("\n");
        let spool = spool_text(&self.dir.0.join("spool"));
        assert!(
            lines.contains("config_digest") && spool.contains("config_digest"),
            "no agent record to check"
        );
        for (what, text) in [
            ("the flush's output", said),
            ("stderr", &stderr),
            ("the records written", &lines),
            ("the spool", &spool),
        ] {
            assert!(!text.contains(secret), "{what} shows the secret: {text}");
        }
    }
}

fn ingest(col: &Collector) -> String {
    col.url("/ingest")
}

#[test]
fn a_private_ca_is_trusted_when_configured_and_the_password_never_shows() {
    if !require_root("private_ca") {
        return;
    }
    let pki = TestPki::new();
    let col = Collector::start_tls(pki.server_config(false), |_| Answer::Status(200, vec![]));
    let password = format!("pw-{:08x}", rand_u32());
    let pw_file = write_private(&pki.dir.0, "password", &format!("{password}\n"));
    let auth = format!(
        "user = \"sockacct\"\npassword_file = \"{}\"\ndeadline_ms = 5000\n",
        pw_file.display()
    );

    // With the CA: uploaded and acknowledged.
    let a = agent(
        "ca-ok",
        &format!(
            "url = \"{}\"\nca_file = \"{}\"\n{auth}",
            ingest(&col),
            pki.ca.display()
        ),
    );
    let (code, r, said, _) = a.flush();
    assert_eq!(code, 0, "{said}");
    assert_eq!(r["ok"], true, "{r}");
    let records = r["sent"]["records"].as_u64().unwrap();
    assert!(records >= 1, "{r}");
    let reqs = col.requests();
    let lines: Vec<String> = reqs.iter().flat_map(Received::lines).collect();
    assert_eq!(
        lines.len() as u64,
        records,
        "the server holds what was acknowledged"
    );
    assert!(
        lines.iter().any(|l| l.contains("\"type\":\"agent\"")),
        "{lines:?}"
    );
    assert!(
        reqs.iter()
            .all(|r| r.headers["authorization"].starts_with("Basic ")),
        "basic auth on every request"
    );
    let st = a.d.control(json!({"cmd": "status"}));
    assert_eq!(st["upload"]["records_sent"], records, "{}", st["upload"]);
    assert_eq!(st["spool"]["pending_segments"], 0, "{}", st["spool"]);
    a.stop_and_check_hidden(&password, &said);
    assert!(col.tls_errors().is_empty(), "{:?}", col.tls_errors());

    // Without it: the public roots do not know the test's CA. A clear error at once, not
    // a minute of retries, and the password nowhere.
    let served = col.requests().len();
    let b = agent("ca-missing", &format!("url = \"{}\"\n{auth}", ingest(&col)));
    let (code, r, said, took) = b.flush();
    assert_ne!(code, 0, "{said}");
    assert_eq!(r["ok"], false, "{r}");
    let err = r["error"].as_str().unwrap();
    eprintln!("without ca_file: {err}");
    for needle in [
        "failed in the TLS handshake",
        "UnknownIssuer",
        "not signed by a trusted CA",
        "[upload] ca_file",
    ] {
        assert!(err.contains(needle), "no {needle:?} in: {err}");
    }
    assert!(took < Duration::from_secs(4), "took {took:?}: not retried");
    assert_eq!(col.requests().len(), served, "nothing reached the server");
    b.stop_and_check_hidden(&password, &said);
}

#[test]
fn a_collector_that_requires_a_client_certificate() {
    if !require_root("client_cert") {
        return;
    }
    let pki = TestPki::new();
    let col = Collector::start_tls(pki.server_config(true), |_| Answer::Status(200, vec![]));
    let base = format!(
        "url = \"{}\"\nca_file = \"{}\"\ndeadline_ms = 5000\n",
        ingest(&col),
        pki.ca.display()
    );
    let with = |cert: &Path, key: &Path| {
        format!(
            "{base}client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };

    let a = agent("mtls-ok", &with(&pki.client_cert, &pki.client_key));
    let (code, r, said, _) = a.flush();
    assert_eq!(code, 0, "{said}");
    assert!(r["sent"]["records"].as_u64().unwrap() >= 1, "{r}");
    assert!(!col.requests().is_empty());
    assert!(col.tls_errors().is_empty(), "{:?}", col.tls_errors());
    drop(a);

    for (tag, upload, server_saw) in [
        ("mtls-none", base.clone(), "certificate"),
        (
            "mtls-stranger",
            with(&pki.stranger_cert, &pki.stranger_key),
            "UnknownIssuer",
        ),
    ] {
        let served = col.requests().len();
        let refused_before = col.tls_errors().len();
        let b = agent(tag, &upload);
        let (code, r, said, took) = b.flush();
        assert_ne!(code, 0, "{tag}: {said}");
        let err = r["error"].as_str().unwrap();
        eprintln!("{tag}: {err}");
        assert!(
            err.contains("client_cert_file") && err.contains("client_key_file"),
            "{tag}: the error does not say what to set: {err}"
        );
        assert!(
            took < Duration::from_secs(4),
            "{tag}: took {took:?}: not retried"
        );
        assert_eq!(col.requests().len(), served, "{tag}: a request got through");
        // The server records its side after sending the alert the client already read.
        wait_for(
            &format!("{tag}: the server to refuse the handshake ({server_saw})"),
            Duration::from_secs(5),
            || {
                col.tls_errors()[refused_before..]
                    .iter()
                    .any(|e| e.contains(server_saw))
                    .then_some(())
            },
        );
    }
}
