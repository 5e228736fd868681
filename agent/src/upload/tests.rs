//! The uploader against a scripted HTTP/1.1 server on 127.0.0.1.
use super::*;
use std::sync::{Arc, Mutex};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

// ---- a tiny scripted HTTP/1.1 server -------------------------------------------------

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    /// Path and query, as on the request line.
    target: String,
    /// Names lower-cased, in arrival order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// When the request head had arrived.
    at: std::time::Instant,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n == name).count()
    }
}

#[derive(Debug, Clone)]
enum Reply {
    /// Status, extra headers, body.
    Status(u16, Vec<(&'static str, String)>, Vec<u8>),
    /// Close the connection without answering (FIN).
    Close,
    /// Reset the connection without answering (RST).
    Reset,
    /// Keep the connection open without answering.
    Hang,
}

fn status(code: u16, body: &str) -> Reply {
    Reply::Status(code, vec![], body.as_bytes().to_vec())
}

struct Server {
    addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<Recorded>>>,
}

impl Server {
    /// Answers the n-th request with `script[n]`, then 200 "ok" once the script ran out.
    async fn start(script: Vec<Reply>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let log2 = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, log2.clone(), script.clone()));
            }
        });
        Server { addr, log }
    }

    fn url(&self, path_and_query: &str) -> Url {
        Url::parse(&format!("http://{}{}", self.addr, path_and_query)).unwrap()
    }

    fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }
}

async fn serve(mut stream: TcpStream, log: Arc<Mutex<Vec<Recorded>>>, script: Arc<Vec<Reply>>) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let at = std::time::Instant::now();
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let method = request_line.next().unwrap_or("").to_string();
    let target = request_line.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let reply = {
        let mut log = log.lock().unwrap();
        log.push(Recorded {
            method,
            target,
            headers,
            body,
            at,
        });
        script
            .get(log.len() - 1)
            .cloned()
            .unwrap_or_else(|| status(200, "ok"))
    };
    match reply {
        Reply::Status(code, extra, body) => {
            let mut out = format!(
                "HTTP/1.1 {code} Whatever\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (n, v) in extra {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
            out.push_str("\r\n");
            let mut out = out.into_bytes();
            out.extend_from_slice(&body);
            let _ = stream.write_all(&out).await;
            let _ = stream.shutdown().await;
        }
        Reply::Close => drop(stream),
        Reply::Reset => {
            let _ = stream.set_zero_linger();
            drop(stream);
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(stream);
        }
    }
}

// ---- helpers -------------------------------------------------------------------------

const LINES: &str = concat!(
    "{\"v\":1,\"type\":\"delta\",\"agent\":\"host-a\",\"boot\":\"b00t\",\"seq\":41}\n",
    "{\"v\":1,\"type\":\"delta\",\"agent\":\"host-a\",\"boot\":\"b00t\",\"seq\":42}\n",
    "{\"v\":1,\"type\":\"delta\",\"agent\":\"host-a\",\"boot\":\"b00t\",\"seq\":43}\n",
);

/// Two whole zstd frames, as the spool writes them.
fn body() -> Body {
    let (a, b) = LINES.split_at(LINES.find("\n").unwrap() + 1);
    let mut bytes = zstd::encode_all(a.as_bytes(), 3).unwrap();
    bytes.extend(zstd::encode_all(b.as_bytes(), 3).unwrap());
    Body {
        segment: "seg-00000000000000000041.zst".into(),
        data: bytes,
        first_seq: 41,
        last_seq: 43,
        records: 3,
        frames: 2,
        oversize: false,
        pos: crate::spool::CursorPos {
            segment: "seg-00000000000000000041.zst".into(),
            offset: 0,
            last_seq: 43,
        },
        agent: "host-a".into(),
        boot: "b00t".into(),
    }
}

fn config(url: Url) -> UploadConfig {
    UploadConfig {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        timeout: Duration::from_secs(3),
        ..UploadConfig::new(url)
    }
}

fn in_secs(s: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(s)
}

fn temp_path(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "sockacct-upload-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

// ---- requests ------------------------------------------------------------------------

#[tokio::test]
async fn headers_query_and_body_are_sent_as_given() {
    let server = Server::start(vec![status(200, "Ok.\n")]).await;
    let target = "/ingest/v1?query=INSERT%20INTO%20t%20FORMAT%20JSONEachRow&x=a%2Bb&y";
    let up = Uploader::new(config(server.url(target))).unwrap();
    let b = body();
    let receipt = up.send(&b, in_secs(5.0)).await.unwrap();
    assert_eq!(receipt.status, 200);
    assert_eq!(receipt.attempts, 1);
    assert_eq!(receipt.server_said, "Ok.\n");

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, target);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    assert_eq!(r.header("content-encoding"), Some("zstd"));
    assert_eq!(
        r.header("content-length"),
        Some(b.data.len().to_string().as_str())
    );
    assert_eq!(r.header("user-agent"), Some(USER_AGENT));
    assert!(USER_AGENT.starts_with("sockacct/"));
    assert_eq!(r.header("x-sockacct-agent"), Some("host-a"));
    assert_eq!(r.header("x-sockacct-boot"), Some("b00t"));
    assert_eq!(r.header("x-sockacct-seq-first"), Some("41"));
    assert_eq!(r.header("x-sockacct-seq-last"), Some("43"));
    assert_eq!(r.header("x-sockacct-records"), Some("3"));
    assert_eq!(r.header("idempotency-key"), Some("host-a:b00t:41-43"));
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.body, b.data);
    let decoded = zstd::decode_all(&r.body[..]).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), LINES);
}

#[tokio::test]
async fn server_said_is_cut_at_512_bytes() {
    let long = "x".repeat(2000);
    let server = Server::start(vec![status(202, &long)]).await;
    let up = Uploader::new(config(server.url("/"))).unwrap();
    let receipt = up.send(&body(), in_secs(5.0)).await.unwrap();
    assert_eq!(receipt.status, 202);
    assert_eq!(receipt.server_said.len(), 512);
}

// ---- retries -------------------------------------------------------------------------

#[tokio::test]
async fn retries_500_with_the_same_idempotency_key() {
    let server = Server::start(vec![status(500, "try later"), status(200, "ok")]).await;
    let up = Uploader::new(config(server.url("/in"))).unwrap();
    let receipt = up.send(&body(), in_secs(5.0)).await.unwrap();
    assert_eq!((receipt.status, receipt.attempts), (200, 2));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].header("idempotency-key"), Some("host-a:b00t:41-43"));
    assert_eq!(
        reqs[0].header("idempotency-key"),
        reqs[1].header("idempotency-key")
    );
    assert_eq!(reqs[0].body, reqs[1].body);
    assert_eq!(reqs[1].target, "/in");
    // Waited at least half the initial backoff.
    assert!(reqs[1].at - reqs[0].at >= Duration::from_millis(10));
}

#[tokio::test]
async fn retries_408_and_503() {
    let server = Server::start(vec![status(408, ""), status(503, "busy"), status(204, "")]).await;
    let up = Uploader::new(config(server.url("/"))).unwrap();
    let receipt = up.send(&body(), in_secs(5.0)).await.unwrap();
    assert_eq!((receipt.status, receipt.attempts), (204, 3));
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn honours_retry_after_seconds_on_429() {
    let server = Server::start(vec![
        Reply::Status(
            429,
            vec![("Retry-After", "1".into())],
            b"slow down".to_vec(),
        ),
        status(200, "ok"),
    ])
    .await;
    let up = Uploader::new(config(server.url("/"))).unwrap();
    let receipt = up.send(&body(), in_secs(5.0)).await.unwrap();
    assert_eq!(receipt.attempts, 2);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    let gap = reqs[1].at - reqs[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "second attempt after {gap:?}"
    );
    assert!(gap < Duration::from_secs(2), "second attempt after {gap:?}");
}

#[tokio::test]
async fn retry_after_past_the_deadline_gives_up_at_once() {
    let server = Server::start(vec![Reply::Status(
        503,
        vec![("Retry-After", "120".into())],
        b"maintenance".to_vec(),
    )])
    .await;
    let up = Uploader::new(config(server.url("/"))).unwrap();
    let started = std::time::Instant::now();
    let err = up.send(&body(), in_secs(5.0)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    let msg = err.to_string();
    assert!(
        matches!(err, UploadError::DeadlineExceeded { attempts: 1, .. }),
        "{msg}"
    );
    assert!(msg.contains("deadline exceeded after 1 attempt"), "{msg}");
    assert!(
        msg.contains("HTTP 503") && msg.contains("maintenance"),
        "{msg}"
    );
    assert!(msg.contains("retry after 120s"), "{msg}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn retries_after_the_connection_is_closed_or_reset() {
    let server = Server::start(vec![Reply::Close, Reply::Reset, status(200, "ok")]).await;
    let up = Uploader::new(config(server.url("/"))).unwrap();
    let receipt = up.send(&body(), in_secs(5.0)).await.unwrap();
    assert_eq!((receipt.status, receipt.attempts), (200, 3));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    assert!(
        reqs.iter()
            .all(|r| r.header("idempotency-key") == Some("host-a:b00t:41-43"))
    );
}

#[tokio::test]
async fn connection_refused_is_retried_until_the_deadline() {
    // Bind and drop: nothing listens on the port any more.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let up = Uploader::new(config(Url::parse(&format!("http://{addr}/x")).unwrap())).unwrap();
    let err = up.send(&body(), in_secs(0.3)).await.unwrap_err();
    let msg = err.to_string();
    let UploadError::DeadlineExceeded { attempts, .. } = err else {
        panic!("{msg}")
    };
    assert!(attempts >= 2, "{msg}");
    assert!(msg.contains(&format!("http://{addr}/x")), "{msg}");
    assert!(msg.to_lowercase().contains("connect"), "{msg}");
}

#[tokio::test]
async fn a_hanging_server_times_out_then_the_deadline_ends_it() {
    let server = Server::start(vec![Reply::Hang; 10]).await;
    let cfg = UploadConfig {
        timeout: Duration::from_millis(300),
        ..config(server.url("/h"))
    };
    let up = Uploader::new(cfg).unwrap();
    let started = std::time::Instant::now();
    let err = up.send(&body(), in_secs(1.0)).await.unwrap_err();
    let took = started.elapsed();
    let msg = err.to_string();
    let UploadError::DeadlineExceeded { attempts, .. } = err else {
        panic!("{msg}")
    };
    assert!(attempts >= 2, "{msg}");
    assert_eq!(server.requests().len() as u32, attempts, "{msg}");
    assert!(took < Duration::from_millis(1300), "took {took:?}: {msg}");
    assert!(
        msg.contains(&format!(
            "upload to http://{}/h: deadline exceeded after",
            server.addr
        )),
        "{msg}"
    );
    assert!(msg.contains("(last error: no response within"), "{msg}");
}

#[tokio::test]
async fn a_passed_deadline_makes_no_request() {
    let server = Server::start(vec![]).await;
    let up = Uploader::new(config(server.url("/"))).unwrap();
    let err = up.send(&body(), Instant::now()).await.unwrap_err();
    assert!(
        matches!(err, UploadError::DeadlineExceeded { attempts: 0, .. }),
        "{err}"
    );
    assert!(server.requests().is_empty());
}

// ---- rejections ----------------------------------------------------------------------

#[tokio::test]
async fn a_400_is_not_retried_and_the_error_says_why() {
    let server = Server::start(vec![status(
        400,
        "Cannot parse input: unknown field `labelz`\n",
    )])
    .await;
    let up = Uploader::new(config(server.url("/"))).unwrap();
    let err = up.send(&body(), in_secs(5.0)).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.status(), Some(400));
    assert!(
        matches!(err, UploadError::Rejected { attempts: 1, .. }),
        "{msg}"
    );
    assert!(msg.contains("HTTP 400 Bad Request"), "{msg}");
    assert!(msg.contains("unknown field `labelz`"), "{msg}");
    assert!(msg.contains(&server.addr.to_string()), "{msg}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let server = Server::start(vec![Reply::Status(
        302,
        vec![("Location", "/elsewhere".into())],
        vec![],
    )])
    .await;
    let up = Uploader::new(config(server.url("/"))).unwrap();
    let err = up.send(&body(), in_secs(5.0)).await.unwrap_err();
    assert_eq!(err.status(), Some(302));
    assert!(
        err.to_string().contains("redirects are not followed"),
        "{err}"
    );
    assert_eq!(server.requests().len(), 1);
}

// ---- bearer token --------------------------------------------------------------------

#[tokio::test]
async fn bearer_token_is_read_from_the_file_at_each_send() {
    let server = Server::start(vec![]).await;
    let path = temp_path("token");
    std::fs::write(&path, "  s3cr3t-one\n").unwrap();
    let cfg = UploadConfig {
        auth: Auth::Bearer {
            token_file: path.clone(),
        },
        ..config(server.url("/"))
    };
    let up = Uploader::new(cfg).unwrap();
    up.send(&body(), in_secs(5.0)).await.unwrap();
    std::fs::write(&path, "s3cr3t-two").unwrap();
    up.send(&body(), in_secs(5.0)).await.unwrap();
    std::fs::remove_file(&path).unwrap();

    let reqs = server.requests();
    assert_eq!(reqs[0].header("authorization"), Some("Bearer s3cr3t-one"));
    assert_eq!(reqs[1].header("authorization"), Some("Bearer s3cr3t-two"));
    assert_eq!(reqs[1].header_count("authorization"), 1);
}

#[tokio::test]
async fn a_missing_or_empty_token_file_is_a_clear_error() {
    let server = Server::start(vec![]).await;
    let path = temp_path("missing");
    let cfg = UploadConfig {
        auth: Auth::Bearer {
            token_file: path.clone(),
        },
        ..config(server.url("/"))
    };
    let up = Uploader::new(cfg).unwrap();
    let err = up.send(&body(), in_secs(5.0)).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, UploadError::SecretFile { .. }), "{msg}");
    assert!(msg.contains("bearer token file"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("No such file"), "{msg}");

    std::fs::write(&path, " \n").unwrap();
    let err = up.send(&body(), in_secs(5.0)).await.unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(err, UploadError::SecretEmpty { .. }), "{err}");
    assert!(server.requests().is_empty());
}

// ---- config and parsing --------------------------------------------------------------

#[test]
fn only_http_and_https_are_accepted() {
    let err = Uploader::new(UploadConfig::new(
        Url::parse("ftp://example.com/x").unwrap(),
    ))
    .unwrap_err();
    assert!(matches!(err, UploadError::BadScheme { .. }));
    assert!(err.to_string().contains("\"ftp\""), "{err}");
    let err = Uploader::new(UploadConfig::new(Url::parse("file:///tmp/x").unwrap())).unwrap_err();
    assert!(matches!(err, UploadError::BadScheme { .. }), "{err}");
    Uploader::new(UploadConfig::new(
        Url::parse("https://example.com/x").unwrap(),
    ))
    .unwrap();
}

#[test]
fn bad_identity_is_refused_before_sending() {
    let up = Uploader::new(UploadConfig::new(
        Url::parse("http://127.0.0.1:9/").unwrap(),
    ))
    .unwrap();
    let b = Body {
        agent: "bad\nagent".into(),
        ..body()
    };
    let err = up.build_request(&b).unwrap_err();
    assert!(
        matches!(
            err,
            UploadError::BadHeader {
                field: "agent id",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_url_with_credentials_is_refused_without_showing_them() {
    for u in [
        "https://u:hunter2@ch.example/",
        "https://ch.example/?user=u&password=hunter2",
    ] {
        let err = Uploader::new(UploadConfig::new(Url::parse(u).unwrap())).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, UploadError::InvalidConfig(_)), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(
            msg.contains("token_file") && msg.contains("password_file"),
            "{msg}"
        );
    }
}

#[tokio::test]
async fn basic_auth_from_a_password_file_and_echoed_secrets_are_hidden() {
    let server = Server::start(vec![
        status(200, "ok"),
        // A server that echoes the request's Authorization header back.
        status(
            401,
            "bad credentials: Basic ZGVmYXVsdDpwQHNzIHfDtnJk (p@ss w\u{f6}rd)",
        ),
    ])
    .await;
    let path = temp_path("password");
    std::fs::write(&path, "p@ss w\u{f6}rd\n").unwrap();
    let cfg = UploadConfig {
        auth: Auth::Basic {
            user: "default".into(),
            password_file: Some(path.clone()),
        },
        ..config(server.url("/"))
    };
    let up = Uploader::new(cfg).unwrap();
    up.send(&body(), in_secs(5.0)).await.unwrap();
    let err = up.send(&body(), in_secs(5.0)).await.unwrap_err();
    std::fs::remove_file(&path).unwrap();
    let msg = err.to_string();
    assert_eq!(err.status(), Some(401), "{msg}");
    assert!(
        !msg.contains("ZGVmYXVsdDpwQHNzIHfDtnJk") && !msg.contains("p@ss"),
        "{msg}"
    );
    assert!(msg.contains("bad credentials: Basic ***"), "{msg}");
    let reqs = server.requests();
    assert_eq!(
        reqs[0].header("authorization"),
        Some("Basic ZGVmYXVsdDpwQHNzIHfDtnJk"),
        "base64 of default:p@ss w\u{f6}rd, the line end dropped"
    );
    assert_eq!(reqs[0].header_count("authorization"), 1);
}

#[test]
fn backoff_doubles_up_to_the_cap_with_jitter() {
    let (i, m) = (Duration::from_millis(250), Duration::from_secs(10));
    assert_eq!(backoff(1, i, m), Duration::from_millis(250));
    assert_eq!(backoff(2, i, m), Duration::from_millis(500));
    assert_eq!(backoff(3, i, m), Duration::from_secs(1));
    assert_eq!(backoff(7, i, m), Duration::from_secs(10));
    assert_eq!(backoff(u32::MAX, i, m), Duration::from_secs(10));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let j = jittered(Duration::from_secs(1));
        assert!(
            j >= Duration::from_millis(500) && j <= Duration::from_secs(1),
            "{j:?}"
        );
        seen.insert(j);
    }
    assert!(seen.len() > 100, "jitter is not random");
    assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
}

#[test]
fn http_dates_in_all_three_forms() {
    let want = UNIX_EPOCH + Duration::from_secs(784_111_777);
    assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(want));
    assert_eq!(
        parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"),
        Some(want)
    );
    assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Some(want));
    assert_eq!(
        parse_http_date("Thu, 29 Feb 2024 23:59:59 GMT"),
        Some(UNIX_EPOCH + Duration::from_secs(1_709_251_199))
    );
    for bad in [
        "",
        "soon",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 31 Nov 1994 08:49:37 GMT",
        "Thu, 29 Feb 2023 12:00:00 GMT",
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "Sun, 06 Foo 1994 08:49:37 GMT",
        "Sun, 6 Nov 1994 08:49:37 GMT",
    ] {
        assert_eq!(parse_http_date(bad), None, "{bad:?}");
    }
}

#[test]
fn retry_after_values() {
    let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
    assert_eq!(retry_after_delay("1", now), Some(Duration::from_secs(1)));
    assert_eq!(
        retry_after_delay(" 120 ", now),
        Some(Duration::from_secs(120))
    );
    assert_eq!(
        retry_after_delay("99999999999999999999999", now),
        Some(RETRY_AFTER_MAX)
    );
    assert_eq!(
        retry_after_delay("Sun, 06 Nov 1994 08:50:07 GMT", now),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        retry_after_delay("Sun, 06 Nov 1994 08:00:00 GMT", now),
        Some(Duration::ZERO)
    );
    assert_eq!(retry_after_delay("-1", now), None);
    assert_eq!(retry_after_delay("1.5", now), None);
    assert_eq!(retry_after_delay("later", now), None);
}
