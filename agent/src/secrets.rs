//! Secrets and URLs: the one place that decides which parts of an upload URL are secret,
//! how every message shows a URL ([`redact_url`], [`redact_url_text`]), and which URLs are
//! refused because they carry a credential ([`url_credential`]).
//!
//! Why credentials are refused in the URL rather than accepted and hidden: the URL is given
//! in `--upload-url` (argv, readable by every local user in /proc) or in the config file
//! (installed 0644), shows up in every log line about an upload and is the natural thing to
//! paste into a ticket. Secrets live in files only root reads (`[upload] token_file`,
//! `password_file`), which are also read again at every send, so rotating one needs no
//! restart. Redaction stays as a second line: a URL that reaches a message is always shown
//! through [`redact_url`], whatever it holds.
//!
//! A leaf module: imports nothing of the crate.
use reqwest::Url;

/// What a message shows instead of a secret.
pub const HIDDEN: &str = "***";

/// Substrings of query parameter names whose values are hidden in messages. Broad on
/// purpose: hiding a harmless value costs nothing.
const SECRET_LOOKING: [&str; 7] = ["pass", "pwd", "token", "secret", "key", "auth", "sig"];

/// Query parameter names (decoded, lower-cased) that are refused in an upload URL: exactly
/// these, or names ending in one of [`REFUSED_PARAM_SUFFIXES`] (`db_password`,
/// `access_token`). Narrower than [`SECRET_LOOKING`] so that settings such as ClickHouse's
/// `quota_key` stay usable.
const REFUSED_PARAMS: [&str; 8] = [
    "password", "passwd", "pass", "pwd", "token", "key", "secret", "auth",
];
const REFUSED_PARAM_SUFFIXES: [&str; 6] = [
    "password", "passwd", "_token", "secret", "api_key", "apikey",
];

/// A credential found in a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlCredential {
    /// `user:password@`
    Password,
    /// `user@` without a password: not a secret, but it would be sent as basic auth with
    /// an empty password, behind the back of `[upload] user`.
    User,
    /// A query parameter that carries a credential (its name as written).
    QueryParam(String),
}

impl UrlCredential {
    /// What the operator should do instead, for an error message.
    pub fn advice(&self) -> String {
        const FILES: &str = "keep it in a file only root can read, named by \
             [upload] password_file (with [upload] user = \"NAME\" for HTTP basic auth, as \
             ClickHouse takes it) or [upload] token_file (a bearer token)";
        match self {
            UrlCredential::Password => format!(
                "it carries a password (user:password@), which would be visible in argv, \
                 the config file and logs: remove it from the URL and {FILES}"
            ),
            UrlCredential::User => "it carries a user name (user@): remove it from the URL and \
                 set [upload] user = \"NAME\" (with [upload] password_file for its password)"
                .to_string(),
            UrlCredential::QueryParam(name) => format!(
                "its query string carries a credential ({name}=), which would be visible in \
                 argv, the config file and logs: remove it from the URL and {FILES}"
            ),
        }
    }
}

/// The credential a URL carries, if any (the first found).
pub fn url_credential(url: &Url) -> Option<UrlCredential> {
    if url.password().is_some() {
        return Some(UrlCredential::Password);
    }
    if !url.username().is_empty() {
        return Some(UrlCredential::User);
    }
    url.query()?.split('&').find_map(|part| {
        let name = part.split_once('=').map_or(part, |(n, _)| n);
        let decoded = percent_decode(name).to_ascii_lowercase();
        let refused = REFUSED_PARAMS.contains(&decoded.as_str())
            || REFUSED_PARAM_SUFFIXES.iter().any(|s| decoded.ends_with(s));
        refused.then(|| UrlCredential::QueryParam(name.to_string()))
    })
}

/// The URL for a message: its password and the values of secret-looking query parameters
/// replaced by `***`; everything else (the user name, other parameters) exactly as given.
pub fn redact_url(url: &Url) -> String {
    rewrite(url, Some(HIDDEN)).to_string()
}

/// [`redact_url`] for text that may not parse as a URL (a config value being refused):
/// without a parse, everything between `://` and the last `@` of the authority is hidden,
/// and the query is rewritten the same way.
pub fn redact_url_text(text: &str) -> String {
    if let Ok(url) = Url::parse(text) {
        return redact_url(&url);
    }
    let (before_query, query) = match text.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (text, None),
    };
    let mut shown = match before_query.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '#']).unwrap_or(rest.len());
            let (authority, path) = rest.split_at(end);
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://{HIDDEN}@{host}{path}"),
                None => before_query.to_string(),
            }
        }
        None => before_query.to_string(),
    };
    if let Some(q) = query {
        shown.push('?');
        shown.push_str(&rewrite_query(q, HIDDEN).unwrap_or_else(|| q.to_string()));
    }
    shown
}

/// The URL with its secrets removed rather than hidden (password dropped, secret query
/// values emptied): what the config digest is computed over, so that two configs that
/// differ only in a secret have the same digest and the digest says nothing about it.
pub fn strip_url(text: &str) -> String {
    match Url::parse(text) {
        Ok(url) => rewrite(&url, None).to_string(),
        // Unparseable URLs are refused by validation; never digest the raw text anyway.
        Err(_) => redact_url_text(text),
    }
}

/// `url` with the password set to `with` (or removed) and secret query values replaced.
fn rewrite(url: &Url, with: Option<&str>) -> Url {
    let mut out = url.clone();
    if out.password().is_some() {
        let _ = out.set_password(with);
    }
    if let Some(q) = url.query()
        && let Some(q) = rewrite_query(q, with.unwrap_or(""))
    {
        out.set_query(Some(&q));
    }
    out
}

/// The query with the values of secret-looking parameters replaced by `with`, byte for
/// byte otherwise; None when nothing changed.
fn rewrite_query(query: &str, with: &str) -> Option<String> {
    let mut changed = false;
    let parts: Vec<String> = query
        .split('&')
        .map(|part| {
            let name = part.split_once('=').map_or(part, |(n, _)| n);
            let decoded = percent_decode(name).to_ascii_lowercase();
            if SECRET_LOOKING.iter().any(|s| decoded.contains(s)) {
                changed = true;
                format!("{name}={with}")
            } else {
                part.to_string()
            }
        })
        .collect();
    changed.then(|| parts.join("&"))
}

/// `application/x-www-form-urlencoded` decoding of a name (`%xx` and `+`), lossy: enough
/// to see `pass%77ord` for what it is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` with every occurrence of each secret replaced by `***` (for what a server said,
/// which may echo a header back). Secrets shorter than 4 bytes are left alone: hiding
/// every "a" would say more than it hides.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        if out.contains(s) {
            out = out.replace(s, HIDDEN);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn messages_hide_passwords_and_secret_parameters() {
        let u = url(
            "https://u:hunter2@ch.example:8443/?query=INSERT%20INTO%20t%20FORMAT%20JSONEachRow&password=hunter2&api_key=k&pass%77ord=p2",
        );
        let shown = redact_url(&u);
        assert!(
            !shown.contains("hunter2") && !shown.contains("=k") && !shown.contains("p2"),
            "{shown}"
        );
        assert!(
            shown.starts_with("https://u:***@ch.example:8443/"),
            "{shown}"
        );
        assert!(
            shown.contains("query=INSERT%20INTO%20t%20FORMAT%20JSONEachRow"),
            "{shown}"
        );
        assert!(
            shown.contains("password=***") && shown.contains("api_key=***"),
            "{shown}"
        );
        assert_eq!(redact_url(&url("http://h/p?query=x")), "http://h/p?query=x");
    }

    #[test]
    fn unparseable_text_is_hidden_too() {
        for (text, secret) in [
            ("https://u:s3cret@[bad/x", "s3cret"),
            ("https://u:s3cret@h:99999/x?password=p4ss", "s3cret"),
            ("htps//h/x?token=t0ken", "t0ken"),
        ] {
            let shown = redact_url_text(text);
            assert!(!shown.contains(secret), "{text} -> {shown}");
        }
        assert_eq!(redact_url_text("not a url"), "not a url");
    }

    #[test]
    fn credentials_in_a_url_are_found() {
        assert_eq!(
            url_credential(&url("https://u:p@h/")),
            Some(UrlCredential::Password)
        );
        assert_eq!(
            url_credential(&url("https://u@h/")),
            Some(UrlCredential::User)
        );
        for (u, name) in [
            ("https://h/?user=x&password=y", "password"),
            ("https://h/?PassWord=y", "PassWord"),
            ("https://h/?db_password=y", "db_password"),
            ("https://h/?access_token=y", "access_token"),
            ("https://h/?pass%77ord=y", "pass%77ord"),
            ("https://h/?x=1&token", "token"),
        ] {
            assert_eq!(
                url_credential(&url(u)),
                Some(UrlCredential::QueryParam(name.into())),
                "{u}"
            );
        }
        for u in [
            "https://h/",
            "https://h/?query=INSERT%20INTO%20t&database=d&user=x",
            "https://h/?quota_key=q&insert_deduplication_token_x=1",
        ] {
            assert_eq!(url_credential(&url(u)), None, "{u}");
        }
    }

    #[test]
    fn stripping_removes_the_secret_and_keeps_the_rest() {
        assert_eq!(
            strip_url("https://u:one@h/p?password=two&database=d"),
            "https://u@h/p?password=&database=d"
        );
        assert_eq!(
            strip_url("https://u:one@h/p?password=two&database=d"),
            strip_url("https://u:other@h/p?password=else&database=d")
        );
        assert_ne!(
            strip_url("https://h/p?database=d"),
            strip_url("https://h/p?database=e")
        );
    }

    #[test]
    fn scrub_hides_exact_secrets() {
        assert_eq!(
            scrub("got Bearer t0k3n and dTpw", &["t0k3n", "dTpw", "ab"]),
            "got Bearer *** and ***"
        );
    }
}
