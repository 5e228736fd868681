//! The `Authorization` header: a bearer token or HTTP basic auth, the secret read from a
//! file at every send (a rotated secret is picked up without a restart), never from argv
//! or the URL. Header values are marked sensitive, so they never show in a `Debug`.
use std::path::{Path, PathBuf};

use reqwest::header::HeaderValue;

use super::UploadError;

/// How requests authenticate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Auth {
    #[default]
    None,
    /// `Authorization: Bearer <token>`, the token from this file.
    Bearer { token_file: PathBuf },
    /// `Authorization: Basic base64(user:password)` (ClickHouse's HTTP interface takes
    /// it), the password from the file; without one, an empty password.
    Basic {
        user: String,
        password_file: Option<PathBuf>,
    },
}

/// One request's header, and the secret strings in it (to be scrubbed from whatever the
/// server says back).
pub(super) struct Credentials {
    pub header: HeaderValue,
    pub secrets: Vec<String>,
}

impl Auth {
    /// The files holding secrets, with their config keys.
    pub fn secret_files(&self) -> Vec<(&'static str, &Path)> {
        match self {
            Auth::None => vec![],
            Auth::Bearer { token_file } => vec![("upload.token_file", token_file)],
            Auth::Basic { password_file, .. } => password_file
                .iter()
                .map(|p| ("upload.password_file", p.as_path()))
                .collect(),
        }
    }

    /// Reads the secret and builds the header (None: no authentication).
    pub(super) fn credentials(&self) -> Result<Option<Credentials>, UploadError> {
        match self {
            Auth::None => Ok(None),
            Auth::Bearer { token_file } => {
                let what = "the bearer token file (upload.token_file)";
                let raw = read_secret(token_file, what)?;
                let token = raw.trim();
                if token.is_empty() {
                    return Err(empty(token_file, what));
                }
                let header = sensitive(&format!("Bearer {token}"), token_file, what)?;
                Ok(Some(Credentials {
                    header,
                    secrets: vec![token.to_string()],
                }))
            }
            Auth::Basic {
                user,
                password_file,
            } => {
                let what = "the password file (upload.password_file)";
                let password = match password_file {
                    Some(path) => {
                        let raw = read_secret(path, what)?;
                        // Only the line end an editor or `echo` adds: spaces may be part
                        // of a password.
                        let p = raw.strip_suffix('\n').unwrap_or(&raw);
                        let p = p.strip_suffix('\r').unwrap_or(p).to_string();
                        if p.is_empty() {
                            return Err(empty(path, what));
                        }
                        if p.contains(['\n', '\r']) {
                            return Err(UploadError::SecretInvalid {
                                what,
                                path: path.clone(),
                            });
                        }
                        p
                    }
                    None => String::new(),
                };
                let encoded = base64(format!("{user}:{password}").as_bytes());
                let header = sensitive(
                    &format!("Basic {encoded}"),
                    password_file.as_deref().unwrap_or(Path::new("-")),
                    what,
                )?;
                Ok(Some(Credentials {
                    header,
                    secrets: vec![password, encoded],
                }))
            }
        }
    }
}

fn read_secret(path: &Path, what: &'static str) -> Result<String, UploadError> {
    std::fs::read_to_string(path).map_err(|source| UploadError::SecretFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn empty(path: &Path, what: &'static str) -> UploadError {
    UploadError::SecretEmpty {
        what,
        path: path.to_path_buf(),
    }
}

fn sensitive(value: &str, path: &Path, what: &'static str) -> Result<HeaderValue, UploadError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| UploadError::SecretInvalid {
        what,
        path: path.to_path_buf(),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// Standard base64 with padding (RFC 4648 §4), for the basic auth header.
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Warns (once, at start) when a file holding a secret can be read by anyone but its
/// owner: the agent still uses it, but every local user may have read it already.
pub fn warn_if_readable(key: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        log::warn!(
            "{key} {} is readable by others (mode {:o}): chmod 600 it, it holds a credential",
            path.display(),
            meta.permissions().mode() & 0o7777
        );
    }
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("default:p@ss wörd", "ZGVmYXVsdDpwQHNzIHfDtnJk"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i}");
        }
    }
}
