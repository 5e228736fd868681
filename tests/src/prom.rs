//! Reading the agent's metrics: a plain HTTP/1.0 GET, the text exposition parsed into
//! samples, and a real Prometheus server (the Debian package) scraping the agent.
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{TempDir, wait_for};

/// One HTTP reply.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// GET `target` from `addr` (HTTP/1.0: the server closes, no chunked bodies).
pub fn get(addr: &str, target: &str, accept: Option<&str>) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(a) = accept {
        req.push_str(&format!("Accept: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let (first, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = first
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(Reply {
        status,
        headers: headers.to_string(),
        body: body.to_string(),
    })
}

/// Percent-encodes a query parameter.
pub fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// One sample of a text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the samples of a text exposition (classic or OpenMetrics), unescaping label
/// values.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = vec![];
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("bad sample line {line:?}"),
        };
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(r) => labels_of(r, line),
            None => (vec![], rest),
        };
        let value = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// Parses `k="v",...}` (after the `{`); returns the labels and what follows the `}`.
fn labels_of<'a>(r: &'a str, line: &str) -> (Vec<(String, String)>, &'a str) {
    let b = r.as_bytes();
    let at = |i: usize| {
        *b.get(i)
            .unwrap_or_else(|| panic!("unterminated labels in {line:?}"))
    };
    let (mut i, mut labels) = (0, vec![]);
    loop {
        while at(i) == b',' || at(i) == b' ' {
            i += 1;
        }
        if at(i) == b'}' {
            return (labels, &r[i + 1..]);
        }
        let k0 = i;
        while at(i) != b'=' {
            i += 1;
        }
        let key = r[k0..i].to_string();
        assert_eq!(at(i + 1), b'"', "{line}");
        i += 2;
        let mut val = vec![];
        loop {
            match at(i) {
                b'\\' => {
                    val.push(if at(i + 1) == b'n' { b'\n' } else { at(i + 1) });
                    i += 2;
                }
                b'"' => {
                    i += 1;
                    break;
                }
                c => {
                    val.push(c);
                    i += 1;
                }
            }
        }
        labels.push((key, String::from_utf8(val).expect("UTF-8 label value")));
    }
}

/// The value of the one sample named `name` whose labels include `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut it = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)));
    let first = it.next()?;
    assert!(it.next().is_none(), "more than one {name} with {labels:?}");
    Some(first.value)
}

/// A real Prometheus server scraping `target` every second, with its storage in a
/// temporary directory; killed and removed on drop.
pub struct Prometheus {
    child: Child,
    pub addr: String,
    _dir: TempDir,
}

/// The Prometheus binary (Debian package `prometheus`; .ci/run installs it).
pub fn prometheus_exe() -> PathBuf {
    let p = PathBuf::from("/usr/bin/prometheus");
    assert!(
        p.exists(),
        "no {}: install Debian's prometheus package (apt-get install prometheus; .ci/run does)",
        p.display()
    );
    p
}

impl Prometheus {
    pub fn start(target: &str) -> Prometheus {
        Prometheus::start_with(target, "")
    }

    /// With more keys in the scrape job (`scheme`, `authorization`, `tls_config`): YAML
    /// lines indented by four spaces.
    pub fn start_with(target: &str, job: &str) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let cfg = dir.0.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: sockacct\n{job}    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(prometheus_exe())
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus");
        let mut p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        wait_for("prometheus to be ready", Duration::from_secs(60), || {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("prometheus exited early: {st}");
            }
            get(&p.addr, "/-/ready", None)
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| ())
        });
        p
    }

    /// The result vector of an instant query.
    pub fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let r = get(
            &self.addr,
            &format!("/api/v1/query?query={}", encode(q)),
            None,
        )
        .expect("query prometheus");
        let v: serde_json::Value =
            serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("bad reply {:?}: {e}", r.body));
        assert_eq!(v["status"], "success", "{q}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query that yields one series, if it does.
    pub fn scalar(&self, q: &str) -> Option<f64> {
        let r = self.query(q);
        match r.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            [] => None,
            more => panic!("{q} gave {} series: {more:?}", more.len()),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
