//! Credentials of the metrics endpoint: a bearer token and TLS (optionally with client
//! certificates), read once at start from the files named in `[metrics]`.
//!
//! Secret files (the token, the TLS key) must be regular files not accessible to other
//! users; anything else is an error at start that names the key and the fix. Each file is
//! opened once and checked on that open descriptor, so what is checked is what is read.
use std::{
    fmt, fs,
    io::{self, Read},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use hyper::header::HeaderValue;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use subtle::ConstantTimeEq;

use crate::config::MetricsSection;

/// Longest token file read; a token is a line.
const MAX_TOKEN_FILE: u64 = 4096;
/// Longest PEM file read (a chain of a few certificates, or a CA bundle).
const MAX_PEM_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("metrics.{key}: cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("metrics.{key}: {} is not a regular file", path.display())]
    NotFile { key: &'static str, path: PathBuf },
    #[error(
        "metrics.{key}: {} is accessible to other users (mode {mode:04o}); it holds a secret: chmod o-rwx it (e.g. 0600, owner root)",
        path.display()
    )]
    Exposed {
        key: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("metrics.{key}: {} is larger than {max} bytes", path.display())]
    TooLarge {
        key: &'static str,
        path: PathBuf,
        max: u64,
    },
    #[error(
        "metrics.bearer_token_file: {} holds no token (expected one line of printable ASCII without spaces)",
        path.display()
    )]
    BadToken { path: PathBuf },
    #[error("metrics.{key}: {}: {what}", path.display())]
    Pem {
        key: &'static str,
        path: PathBuf,
        what: String,
    },
    #[error("metrics TLS: {0} (check that tls_key_file is the key of tls_cert_file)")]
    Tls(String),
}

/// The token scrapers must send; never shown (Debug is redacted).
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// The file's content without surrounding whitespace (as Prometheus reads its
    /// `credentials_file`): visible ASCII only, since it travels in a header.
    pub fn parse(content: &[u8]) -> Option<Token> {
        let t = content.trim_ascii();
        (!t.is_empty() && t.iter().all(u8::is_ascii_graphic)).then(|| Token(t.to_vec()))
    }

    /// `Authorization: Bearer TOKEN` with this token; the comparison takes the same time
    /// wherever the first difference is.
    pub fn admits(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(v) = authorization.map(HeaderValue::as_bytes) else {
            return false;
        };
        let Some((scheme, rest)) = v.split_first_chunk::<7>() else {
            return false;
        };
        scheme.eq_ignore_ascii_case(b"Bearer ") && bool::from(rest.trim_ascii().ct_eq(&self.0))
    }
}

/// What `[metrics]` asks scrapers for.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub token: Option<Token>,
    pub tls: Option<Arc<ServerConfig>>,
    pub client_certs: bool,
}

impl Credentials {
    /// Reads and checks the files `c` names (none: no credentials).
    pub fn load(c: &MetricsSection) -> Result<Credentials, AuthError> {
        let token = match &c.bearer_token_file {
            Some(path) => {
                let bytes = read_file("bearer_token_file", path, true, MAX_TOKEN_FILE)?;
                Some(
                    Token::parse(&bytes)
                        .ok_or_else(|| AuthError::BadToken { path: path.clone() })?,
                )
            }
            None => None,
        };
        let tls = match (&c.tls_cert_file, &c.tls_key_file) {
            (Some(cert), Some(key)) => Some(Arc::new(server_config(
                cert,
                key,
                c.tls_client_ca_file.as_deref(),
            )?)),
            _ => None,
        };
        Ok(Credentials {
            token,
            client_certs: tls.is_some() && c.tls_client_ca_file.is_some(),
            tls,
        })
    }

    /// "none", "bearer" (for `status`).
    pub fn auth_name(&self) -> &'static str {
        if self.token.is_some() {
            "bearer"
        } else {
            "none"
        }
    }
}

/// Opens `path` without blocking (a FIFO must not hang the start), then checks what was
/// opened: a regular file, not too large, and for a secret, no access for other users.
fn read_file(key: &'static str, path: &Path, secret: bool, max: u64) -> Result<Vec<u8>, AuthError> {
    let read_err = |source| AuthError::Read {
        key,
        path: path.to_path_buf(),
        source,
    };
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read_err)?;
    let meta = f.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(AuthError::NotFile {
            key,
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if secret && mode & 0o007 != 0 {
        return Err(AuthError::Exposed {
            key,
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > max {
        return Err(AuthError::TooLarge {
            key,
            path: path.to_path_buf(),
            max,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > max {
        return Err(AuthError::TooLarge {
            key,
            path: path.to_path_buf(),
            max,
        });
    }
    Ok(bytes)
}

fn pem_err(key: &'static str, path: &Path, what: impl fmt::Display) -> AuthError {
    AuthError::Pem {
        key,
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, AuthError> {
    let bytes = read_file(key, path, false, MAX_PEM_FILE)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(key, path, format!("not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(pem_err(key, path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// The rustls server config: ring (the provider reqwest already brings), TLS 1.2 and 1.3,
/// HTTP/1.1 by ALPN.
fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, AuthError> {
    let chain = certificates("tls_cert_file", cert)?;
    let key_bytes = read_file("tls_key_file", key, true, MAX_PEM_FILE)?;
    let private = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|e| pem_err("tls_key_file", key, format!("no private key found ({e})")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| AuthError::Tls(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates("tls_client_ca_file", ca)? {
                roots
                    .add(c)
                    .map_err(|e| pem_err("tls_client_ca_file", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| pem_err("tls_client_ca_file", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, private)
        .map_err(|e| AuthError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, content: &[u8], mode: u32) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sockacct-auth-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn section(token: Option<PathBuf>) -> MetricsSection {
        MetricsSection {
            bearer_token_file: token,
            ..MetricsSection::default()
        }
    }

    #[test]
    fn token_is_trimmed_and_compared_whole() {
        let t = Token::parse(b"  s3cr3t-token\n").unwrap();
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(t.admits(Some(&h("Bearer s3cr3t-token"))));
        assert!(t.admits(Some(&h("bearer s3cr3t-token"))));
        assert!(!t.admits(Some(&h("Bearer s3cr3t-toke"))));
        assert!(!t.admits(Some(&h("Bearer s3cr3t-token2"))));
        assert!(!t.admits(Some(&h("Basic s3cr3t-token"))));
        assert!(!t.admits(Some(&h("Bearer"))));
        assert!(!t.admits(None));
        assert!(Token::parse(b"\n \n").is_none());
        assert!(Token::parse(b"two words").is_none());
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }

    #[test]
    fn token_file_errors_are_clear() {
        let ok = temp("ok", b"abc\n", 0o600);
        let c = Credentials::load(&section(Some(ok))).unwrap();
        assert_eq!(c.auth_name(), "bearer");
        assert!(c.tls.is_none());
        assert_eq!(
            Credentials::load(&section(None)).unwrap().auth_name(),
            "none"
        );

        let cases = [
            (
                temp("world", b"abc", 0o644),
                "is accessible to other users (mode 0644)",
            ),
            (temp("empty", b"\n", 0o600), "holds no token"),
            (
                temp("big", &[b'a'; 5000], 0o600),
                "is larger than 4096 bytes",
            ),
            (PathBuf::from("/nonexistent/sockacct.token"), "cannot read"),
            (std::env::temp_dir(), "is not a regular file"),
        ];
        for (path, want) in cases {
            let e = Credentials::load(&section(Some(path.clone())))
                .expect_err(want)
                .to_string();
            assert!(e.starts_with("metrics.bearer_token_file: "), "{e}");
            assert!(e.contains(want), "{}: {e}", path.display());
        }
        // Group access is the owner's choice (e.g. a group of scrapers); other users' is not.
        let group = temp("group", b"abc", 0o640);
        assert!(Credentials::load(&section(Some(group))).is_ok());
    }

    #[test]
    fn tls_files_are_checked() {
        let junk = temp("cert.pem", b"not a certificate", 0o644);
        let key = temp("key.pem", b"-----BEGIN PRIVATE KEY-----\n", 0o644);
        let c = MetricsSection {
            tls_cert_file: Some(junk.clone()),
            tls_key_file: Some(key),
            ..MetricsSection::default()
        };
        let e = Credentials::load(&c).unwrap_err().to_string();
        assert!(
            e.contains("metrics.tls_cert_file") && e.contains("no CERTIFICATE"),
            "{e}"
        );
    }
}
