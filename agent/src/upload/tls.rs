//! The upload's TLS: rustls through reqwest's own API (no second TLS stack), with an
//! operator's private CA (`[upload] ca_file`) and a client certificate for servers that
//! require one (`client_cert_file` + `client_key_file`, mutual TLS).
//!
//! `ca_file` **replaces** the built-in public roots rather than adding to them: an upload
//! that names its own CA goes to a collector of the operator's, and trusting only that CA
//! means no certificate from any of the ~150 public CAs can stand in for it. To trust a
//! public CA as well, put its certificate into the same file.
//!
//! The files are read and checked when the agent starts (a restart picks up new ones);
//! every problem is an error naming the key and the file, found before anything is sent.
use std::path::{Path, PathBuf};

use reqwest::{Certificate, ClientBuilder, Identity};

use super::{UploadError, describe};

/// The TLS files of an upload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM, one or more CA certificates; when set, the only roots trusted.
    pub ca_file: Option<PathBuf>,
    /// PEM, the client certificate first, then any intermediates.
    pub client_cert_file: Option<PathBuf>,
    /// PEM, the client certificate's private key (PKCS#8, PKCS#1 or SEC1; not encrypted).
    pub client_key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// True when nothing is set (public roots, no client certificate).
    pub fn is_default(&self) -> bool {
        *self == TlsFiles::default()
    }
}

fn problem(key: &'static str, path: &Path, problem: impl Into<String>) -> UploadError {
    UploadError::TlsFile {
        key,
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, UploadError> {
    std::fs::read(path).map_err(|e| problem(key, path, format!("cannot read it: {e}")))
}

/// A client with only what is being checked, to find out whether rustls takes it.
fn trial() -> ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
}

/// The certificates of a PEM file; an error when it holds none or one rustls refuses.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<Certificate>, UploadError> {
    let pem = read(key, path)?;
    let certs = Certificate::from_pem_bundle(&pem).map_err(|e| {
        problem(
            key,
            path,
            format!("is not a PEM certificate file ({})", describe(e)),
        )
    })?;
    if certs.is_empty() {
        return Err(problem(
            key,
            path,
            "holds no certificate (expected PEM blocks -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// `builder` with the roots and client certificate of `files`.
pub(super) fn configure(
    mut builder: ClientBuilder,
    files: &TlsFiles,
) -> Result<ClientBuilder, UploadError> {
    if let Some(path) = &files.ca_file {
        let key = "upload.ca_file";
        let certs = certificates(key, path)?;
        let n = certs.len();
        for (i, c) in certs.iter().enumerate() {
            trial()
                .add_root_certificate(c.clone())
                .build()
                .map_err(|e| {
                    problem(
                        key,
                        path,
                        format!(
                            "certificate {} of {n} is not a usable CA certificate: {}",
                            i + 1,
                            describe(e)
                        ),
                    )
                })?;
        }
        builder = builder.tls_built_in_root_certs(false);
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    match (&files.client_cert_file, &files.client_key_file) {
        (None, None) => {}
        (Some(cert), Some(key)) => builder = builder.identity(identity(cert, key)?),
        (Some(cert), None) => {
            return Err(problem(
                "upload.client_cert_file",
                cert,
                "needs upload.client_key_file (the certificate's private key)",
            ));
        }
        (None, Some(key)) => {
            return Err(problem(
                "upload.client_key_file",
                key,
                "needs upload.client_cert_file (the certificate the key belongs to)",
            ));
        }
    }
    Ok(builder)
}

/// The client identity of a certificate file and a key file, checked: the key is
/// readable, not encrypted, of a kind rustls takes, and belongs to the certificate.
fn identity(cert_path: &Path, key_path: &Path) -> Result<Identity, UploadError> {
    const CERT: &str = "upload.client_cert_file";
    const KEY: &str = "upload.client_key_file";
    certificates(CERT, cert_path)?;
    let cert_pem = read(CERT, cert_path)?;
    let key_pem = read(KEY, key_path)?;
    let text = String::from_utf8_lossy(&key_pem);
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(problem(
            KEY,
            key_path,
            "is encrypted, and the agent cannot ask for a passphrase: store it decrypted \
             (openssl pkey -in KEY -out PLAIN) in a file only root can read",
        ));
    }
    let keys = [
        "-----BEGIN PRIVATE KEY-----",
        "-----BEGIN RSA PRIVATE KEY-----",
        "-----BEGIN EC PRIVATE KEY-----",
    ];
    if !keys.iter().any(|k| text.contains(k)) {
        return Err(problem(
            KEY,
            key_path,
            "holds no private key (expected a PEM block -----BEGIN PRIVATE KEY-----, \
             or its RSA / EC form)",
        ));
    }
    let mut both = cert_pem;
    if !both.ends_with(b"\n") {
        both.push(b'\n');
    }
    both.extend_from_slice(&key_pem);
    let both_files = || format!("{} with {}", cert_path.display(), key_path.display());
    let id = Identity::from_pem(&both).map_err(|e| {
        problem(
            KEY,
            key_path,
            format!(
                "cannot be used with {CERT} {}: {}",
                cert_path.display(),
                describe(e)
            ),
        )
    })?;
    trial().identity(id.clone()).build().map_err(|e| {
        let detail = describe(e);
        if detail.contains("KeyMismatch") {
            problem(
                KEY,
                key_path,
                format!(
                    "is not the private key of the certificate in {CERT} ({})",
                    both_files()
                ),
            )
        } else {
            problem(
                KEY,
                key_path,
                format!("cannot be used with {CERT} ({}): {detail}", both_files()),
            )
        }
    })?;
    Ok(id)
}

/// What to tell the operator about a TLS failure, from the error's text (rustls's
/// messages, which reqwest passes on): None when it is not a certificate problem. Such a
/// failure does not go away by retrying, so the send stops at once.
pub(super) fn certificate_hint(detail: &str) -> Option<&'static str> {
    if detail.contains("invalid peer certificate") {
        return Some(if detail.contains("UnknownIssuer") {
            "the server's certificate is not signed by a trusted CA: if it comes from a \
             private CA, set [upload] ca_file to that CA's certificate (PEM)"
        } else if detail.contains("not valid for name") || detail.contains("NotValidForName") {
            "the server's certificate does not name the host in [upload] url: use the name \
             (or IP address) the certificate was issued for"
        } else if detail.contains("xpired") || detail.contains("NotValidYet") {
            "the server's certificate is outside its validity period (or this host's clock is wrong)"
        } else {
            "the server's certificate was refused: check it and [upload] ca_file"
        });
    }
    const CLIENT_ALERTS: [&str; 7] = [
        "alert: CertificateRequired",
        "alert: BadCertificate",
        "alert: UnknownCA",
        "alert: CertificateUnknown",
        "alert: UnsupportedCertificate",
        "alert: CertificateExpired",
        "alert: CertificateRevoked",
    ];
    if CLIENT_ALERTS.iter().any(|a| detail.contains(a)) {
        return Some(
            "the server wants a client certificate it trusts: set [upload] client_cert_file \
             and client_key_file (a certificate signed by a CA the server accepts)",
        );
    }
    None
}
