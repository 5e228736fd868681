//! Gives every socket exactly one label, once, when the agent first sees it.
//!
//! [`Labeler`] is compiled from the config's `[[rule]]` tables: globs become
//! [`GlobMatcher`]s and label strings become templates, so labelling a socket does no parsing.
//! The first rule whose every present field matches wins; when none does, the label comes
//! from `default_label`.

use std::net::IpAddr;
use std::path::Path;

use globset::{GlobBuilder, GlobMatcher};
use ipnet::IpNet;

use crate::config::{
    Config, ConfigError, DefaultLabel, MAX_LABEL_BYTES, Netns, PortRange, Protocol, Rule,
};

/// Used wherever the source of a label is unknown or empty, so no label is ever "".
pub const UNKNOWN: &str = "unknown";

/// What is known about one socket when it is labelled (once, at first sight).
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketFacts<'a> {
    /// Process name (may be empty if unknown).
    pub process: &'a str,
    /// Full executable path, if known.
    pub exe: Option<&'a str>,
    /// cgroup path relative to the cgroup2 root, no leading '/'; "" = root.
    pub cgroup: Option<&'a str>,
    pub uid: u32,
    /// User name for `uid`, if known.
    pub user: Option<&'a str>,
    /// IPPROTO number: 6 tcp, 17 udp, 1 icmp, 58 icmpv6.
    pub protocol: u8,
    /// 0 if unknown.
    pub local_port: u16,
    /// 0 if unknown.
    pub remote_port: u16,
    pub remote_addr: Option<IpAddr>,
    pub netns_cookie: u64,
}

/// The compiled labelling rules.
#[derive(Debug)]
pub struct Labeler {
    rules: Vec<CompiledRule>,
    default: DefaultLabel,
    host_netns_cookie: u64,
    needs_exe: bool,
    needs_cgroup: bool,
    needs_user: bool,
}

impl Labeler {
    /// Compiles `cfg.rules`. `host_netns_cookie` is the agent's own network namespace, which
    /// `netns = "host"` / `"other"` compare against.
    pub fn new(cfg: &Config, host_netns_cookie: u64) -> Result<Labeler, ConfigError> {
        let rules = cfg
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                CompiledRule::new(r).map_err(|(field, msg)| ConfigError::rule_field(i, field, msg))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let default = cfg.default_label;
        let needs =
            |default_uses: DefaultLabel, fact: Fact, has_field: fn(&CompiledRule) -> bool| {
                default == default_uses || rules.iter().any(|r| has_field(r) || r.label.uses(fact))
            };
        let needs_exe = needs(DefaultLabel::Exe, Fact::Exe, |r| r.exe.is_some());
        let needs_cgroup = needs(DefaultLabel::Cgroup, Fact::Cgroup, |r| r.cgroup.is_some());
        let needs_user = needs(DefaultLabel::User, Fact::User, |r| r.user.is_some());
        Ok(Labeler {
            rules,
            default,
            host_netns_cookie,
            needs_exe,
            needs_cgroup,
            needs_user,
        })
    }

    /// First rule whose every present field matches wins; otherwise the default label.
    /// Never empty, at most [`MAX_LABEL_BYTES`] bytes.
    pub fn label(&self, f: &SocketFacts) -> String {
        let label = match self
            .rules
            .iter()
            .find(|r| r.matches(f, self.host_netns_cookie))
        {
            Some(rule) => rule.label.expand(f),
            None => fact_value(self.default_fact(), f),
        };
        truncate_label(label)
    }

    /// True when the exe path is needed: an `exe` rule, an `{exe}` placeholder or
    /// `default_label = "exe"` (so the caller knows whether to read /proc/PID/exe).
    pub fn needs_exe(&self) -> bool {
        self.needs_exe
    }

    /// True when the cgroup path is needed (rule field, placeholder or default label).
    pub fn needs_cgroup(&self) -> bool {
        self.needs_cgroup
    }

    /// True when the user name is needed (rule field, placeholder or default label).
    pub fn needs_user(&self) -> bool {
        self.needs_user
    }

    fn default_fact(&self) -> Fact {
        match self.default {
            DefaultLabel::Process => Fact::Process,
            DefaultLabel::Exe => Fact::Exe,
            DefaultLabel::Cgroup => Fact::Cgroup,
            DefaultLabel::User => Fact::User,
        }
    }
}

#[derive(Debug)]
struct CompiledRule {
    label: Template,
    process: Option<GlobMatcher>,
    exe: Option<GlobMatcher>,
    cgroup: Option<GlobMatcher>,
    uid: Option<u32>,
    user: Option<String>,
    local_port: Option<PortRange>,
    remote_port: Option<PortRange>,
    remote_cidr: Option<Vec<IpNet>>,
    protocol: Option<Protocol>,
    netns: Option<Netns>,
}

/// (field, message) for one bad rule field; the caller adds the rule index.
type FieldError = (&'static str, String);

impl CompiledRule {
    fn new(r: &Rule) -> Result<CompiledRule, FieldError> {
        let label = Template::parse(&r.label).map_err(|m| ("label", m))?;
        // Process names are comm strings such as "kworker/0:1": '/' is not a separator there.
        let process = r
            .process
            .as_deref()
            .map(|p| compile_glob(p, p, false, r#""nginx" or "php-fpm*""#))
            .transpose()
            .map_err(|m| ("process", m))?;
        let exe = r
            .exe
            .as_deref()
            .map(|p| {
                // A bare name can never equal a full path; point the operator at `process`.
                if !p.starts_with(['/', '*', '?', '[', '{']) {
                    return Err(format!(
                        r#"{p:?} cannot match a full executable path (expected an absolute path pattern such as "/usr/sbin/nginx" or "**/nginx"; use process to match the process name)"#
                    ));
                }
                compile_glob(p, p, true, r#""/usr/sbin/nginx" or "/opt/app/**""#)
            })
            .transpose()
            .map_err(|m| ("exe", m))?;
        // Facts carry the cgroup path without a leading '/'; accept either spelling.
        let cgroup = r
            .cgroup
            .as_deref()
            .map(|p| {
                compile_glob(
                    p.trim_start_matches('/'),
                    p,
                    true,
                    r#""system.slice/nginx.service" or "system.slice/*.service""#,
                )
            })
            .transpose()
            .map_err(|m| ("cgroup", m))?;
        if r.remote_cidr.as_ref().is_some_and(Vec::is_empty) {
            return Err((
                "remote_cidr",
                r#"empty list never matches (expected at least one CIDR, e.g. "10.0.0.0/8")"#
                    .to_string(),
            ));
        }
        Ok(CompiledRule {
            label,
            process,
            exe,
            cgroup,
            uid: r.uid,
            user: r.user.clone(),
            local_port: r.local_port,
            remote_port: r.remote_port,
            remote_cidr: r.remote_cidr.clone(),
            protocol: r.protocol,
            netns: r.netns,
        })
    }

    /// Every present field must match; cheap comparisons first, globs last.
    fn matches(&self, f: &SocketFacts, host_netns_cookie: u64) -> bool {
        fn check<T>(cond: &Option<T>, pred: impl FnOnce(&T) -> bool) -> bool {
            cond.as_ref().is_none_or(pred)
        }
        check(&self.uid, |&u| u == f.uid)
            && check(&self.protocol, |p| p.matches(f.protocol))
            && check(&self.local_port, |r| r.contains(f.local_port))
            && check(&self.remote_port, |r| r.contains(f.remote_port))
            // Cookie 0 means "not known" (e.g. a server-side socket whose owner came from
            // its first send/recv): a netns rule does not match it either way.
            && check(&self.netns, |n| {
                f.netns_cookie != 0
                    && match *n {
                        Netns::Host => f.netns_cookie == host_netns_cookie,
                        Netns::Other => f.netns_cookie != host_netns_cookie,
                        Netns::Cookie(c) => f.netns_cookie == c,
                    }
            })
            && check(&self.remote_cidr, |nets| {
                f.remote_addr.is_some_and(|a| cidr_match(nets, a))
            })
            && check(&self.user, |u| f.user == Some(u.as_str()))
            && check(&self.process, |g| g.is_match(f.process))
            && check(&self.exe, |g| f.exe.is_some_and(|e| g.is_match(e)))
            && check(&self.cgroup, |g| f.cgroup.is_some_and(|c| g.is_match(c)))
    }
}

/// `shown` is the pattern as the operator wrote it, for the error message.
fn compile_glob(
    pattern: &str,
    shown: &str,
    literal_separator: bool,
    example: &str,
) -> Result<GlobMatcher, String> {
    GlobBuilder::new(pattern)
        .literal_separator(literal_separator)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| {
            format!(
                "{shown:?} is not a valid glob: {} (expected e.g. {example})",
                e.kind()
            )
        })
}

/// Dual-stack sockets see IPv4 peers as ::ffff:a.b.c.d; those must match v4 networks too.
fn cidr_match(nets: &[IpNet], addr: IpAddr) -> bool {
    let mapped = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    nets.iter()
        .any(|n| n.contains(&addr) || mapped.is_some_and(|m| n.contains(&m)))
}

/// A fact a label can be built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fact {
    Process,
    Exe,
    Cgroup,
    Uid,
    User,
    LocalPort,
    RemotePort,
}

const PLACEHOLDERS: [(&str, Fact); 7] = [
    ("process", Fact::Process),
    ("exe", Fact::Exe),
    ("cgroup", Fact::Cgroup),
    ("uid", Fact::Uid),
    ("user", Fact::User),
    ("local_port", Fact::LocalPort),
    ("remote_port", Fact::RemotePort),
];

/// The text a fact contributes to a label; never empty.
fn fact_value(fact: Fact, f: &SocketFacts) -> String {
    let or_unknown = |s: Option<&str>| match s {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => UNKNOWN.to_string(),
    };
    match fact {
        Fact::Process => or_unknown(Some(f.process)),
        // The file name, as in `default_label = "exe"`; rules match the full path.
        Fact::Exe => or_unknown(f.exe.map(|e| {
            Path::new(e)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(e)
        })),
        // "" is the root cgroup, which is known, so it gets a name of its own.
        Fact::Cgroup => match f.cgroup {
            Some("") => "/".to_string(),
            other => or_unknown(other),
        },
        Fact::Uid => f.uid.to_string(),
        // An unnamed uid (e.g. a container's) is still worth telling apart.
        Fact::User => f
            .user
            .filter(|u| !u.is_empty())
            .map_or_else(|| f.uid.to_string(), str::to_string),
        Fact::LocalPort => f.local_port.to_string(),
        Fact::RemotePort => f.remote_port.to_string(),
    }
}

/// Cuts to at most MAX_LABEL_BYTES at a char boundary; never returns "".
fn truncate_label(mut s: String) -> String {
    if s.len() > MAX_LABEL_BYTES {
        let mut end = MAX_LABEL_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    if s.is_empty() { UNKNOWN.to_string() } else { s }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Fact(Fact),
}

/// A parsed label: literal text and `{placeholder}`s; `{{` and `}}` are literal braces.
#[derive(Debug)]
struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    fn parse(label: &str) -> Result<Template, String> {
        const VALID: &str =
            "{process}, {exe}, {cgroup}, {uid}, {user}, {local_port}, {remote_port}";
        if label.trim().is_empty() {
            return Err(
                r#"label is empty (expected a non-empty label such as "web" or a template such as "{process}")"#
                    .to_string(),
            );
        }
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = label.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(format!(
                                    "unclosed '{{' in label {label:?} (expected a placeholder such as {{process}}; write '{{{{' for a literal brace)"
                                ));
                            }
                        }
                    }
                    let Some(&(_, fact)) = PLACEHOLDERS.iter().find(|(n, _)| *n == name) else {
                        return Err(format!(
                            "unknown placeholder {{{name}}} in label {label:?} (expected one of {VALID}; write '{{{{' or '}}}}' for a literal brace)"
                        ));
                    };
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Fact(fact));
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => {
                    return Err(format!(
                        "unmatched '}}' in label {label:?} (write '}}}}' for a literal brace)"
                    ));
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        // Longer literal text would be cut, and rules that differ only past the cut would merge.
        let literal: usize = pieces
            .iter()
            .map(|p| if let Piece::Text(t) = p { t.len() } else { 0 })
            .sum();
        if literal > MAX_LABEL_BYTES {
            return Err(format!(
                "label has {literal} bytes of text (expected at most {MAX_LABEL_BYTES} bytes)"
            ));
        }
        Ok(Template { pieces })
    }

    fn uses(&self, fact: Fact) -> bool {
        self.pieces.contains(&Piece::Fact(fact))
    }

    fn expand(&self, f: &SocketFacts) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Fact(fact) => out.push_str(&fact_value(*fact, f)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const HOST_NS: u64 = 4026531840;

    fn labeler(text: &str) -> Labeler {
        let cfg = Config::parse(text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
        Labeler::new(&cfg, HOST_NS).unwrap()
    }

    /// A labeler with one rule `label = "hit"` plus `extra` match fields.
    fn one_rule(extra: &str) -> Labeler {
        labeler(&format!(
            "default_label = \"process\"\n[[rule]]\nlabel = \"hit\"\n{extra}\n"
        ))
    }

    fn facts() -> SocketFacts<'static> {
        SocketFacts {
            process: "nginx",
            exe: Some("/usr/sbin/nginx"),
            cgroup: Some("system.slice/nginx.service"),
            uid: 33,
            user: Some("www-data"),
            protocol: 6,
            local_port: 443,
            remote_port: 51000,
            remote_addr: Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))),
            netns_cookie: HOST_NS,
        }
    }

    fn hits(l: &Labeler, f: &SocketFacts) -> bool {
        l.label(f) == "hit"
    }

    #[test]
    fn unknown_netns_matches_no_netns_rule() {
        let cfg = Config::parse(
            "[[rule]]\nlabel = \"other\"\nnetns = \"other\"\n[[rule]]\nlabel = \"host\"\nnetns = \"host\"\n",
            "t",
        )
        .unwrap();
        let l = Labeler::new(&cfg, 42).unwrap();
        let f = SocketFacts {
            process: "p",
            netns_cookie: 0,
            ..Default::default()
        };
        assert_eq!(l.label(&f), "p");
        let f = SocketFacts {
            process: "p",
            netns_cookie: 7,
            ..Default::default()
        };
        assert_eq!(l.label(&f), "other");
    }

    #[test]
    fn no_rules_uses_process_name() {
        let l = labeler("");
        assert_eq!(l.label(&facts()), "nginx");
        assert!(!l.needs_exe() && !l.needs_cgroup() && !l.needs_user());
    }

    #[test]
    fn first_match_wins() {
        let l = labeler(
            r#"
[[rule]]
label = "web-tls"
process = "nginx"
local_port = 443
[[rule]]
label = "web"
process = "nginx"
[[rule]]
label = "everything-else"
"#,
        );
        assert_eq!(l.label(&facts()), "web-tls");
        assert_eq!(
            l.label(&SocketFacts {
                local_port: 80,
                ..facts()
            }),
            "web"
        );
        assert_eq!(
            l.label(&SocketFacts {
                process: "curl",
                ..facts()
            }),
            "everything-else"
        );
        // A catch-all first shadows everything after it.
        let l =
            labeler("[[rule]]\nlabel = \"all\"\n[[rule]]\nlabel = \"web\"\nprocess = \"nginx\"\n");
        assert_eq!(l.label(&facts()), "all");
    }

    #[test]
    fn all_fields_must_match() {
        let l = one_rule("process = \"nginx\"\nuid = 33\nprotocol = \"tcp\"\nlocal_port = 443");
        assert!(hits(&l, &facts()));
        assert!(!hits(&l, &SocketFacts { uid: 0, ..facts() }));
        assert!(!hits(
            &l,
            &SocketFacts {
                protocol: 17,
                ..facts()
            }
        ));
        assert!(!hits(
            &l,
            &SocketFacts {
                process: "nginx2",
                ..facts()
            }
        ));
    }

    #[test]
    fn process_glob() {
        let l = one_rule("process = \"php-fpm*\"");
        assert!(hits(
            &l,
            &SocketFacts {
                process: "php-fpm8.2",
                ..facts()
            }
        ));
        assert!(!hits(&l, &facts()));
        // '*' crosses '/' in process names.
        let l = one_rule("process = \"kworker*\"");
        assert!(hits(
            &l,
            &SocketFacts {
                process: "kworker/0:1",
                ..facts()
            }
        ));
        // Unknown (empty) process name only matches a pattern that matches "".
        let l = one_rule("process = \"?*\"");
        assert!(!hits(
            &l,
            &SocketFacts {
                process: "",
                ..facts()
            }
        ));
    }

    #[test]
    fn exe_glob() {
        let l = one_rule("exe = \"/usr/sbin/*\"");
        assert!(hits(&l, &facts()));
        assert!(
            !hits(
                &l,
                &SocketFacts {
                    exe: Some("/usr/sbin/x/nginx"),
                    ..facts()
                }
            ),
            "* stays in one component"
        );
        assert!(
            !hits(
                &l,
                &SocketFacts {
                    exe: None,
                    ..facts()
                }
            ),
            "unknown exe never matches"
        );
        let l = one_rule("exe = \"**/nginx\"");
        assert!(hits(&l, &facts()));
        assert!(hits(
            &l,
            &SocketFacts {
                exe: Some("/opt/nginx/sbin/nginx"),
                ..facts()
            }
        ));
        let l = one_rule("exe = \"/opt/app/**\"");
        assert!(hits(
            &l,
            &SocketFacts {
                exe: Some("/opt/app/bin/server"),
                ..facts()
            }
        ));
        assert!(!hits(&l, &facts()));
        assert!(l.needs_exe());
    }

    #[test]
    fn cgroup_glob() {
        let l = one_rule("cgroup = \"system.slice/*.service\"");
        assert!(hits(&l, &facts()));
        assert!(!hits(
            &l,
            &SocketFacts {
                cgroup: Some("system.slice/a.service/sub"),
                ..facts()
            }
        ));
        assert!(!hits(
            &l,
            &SocketFacts {
                cgroup: Some("user.slice/a.service"),
                ..facts()
            }
        ));
        assert!(
            !hits(
                &l,
                &SocketFacts {
                    cgroup: None,
                    ..facts()
                }
            ),
            "unknown cgroup never matches"
        );
        assert!(l.needs_cgroup() && !l.needs_exe() && !l.needs_user());
        let l = one_rule("cgroup = \"kubepods.slice/**\"");
        assert!(hits(
            &l,
            &SocketFacts {
                cgroup: Some("kubepods.slice/kubepods-besteffort.slice/pod1/cri-1.scope"),
                ..facts()
            }
        ));
        // A leading '/' is accepted and means the same path.
        let l = one_rule("cgroup = \"/system.slice/nginx.service\"");
        assert!(hits(&l, &facts()));
        // "" is the root cgroup.
        let l = one_rule("cgroup = \"/\"");
        assert!(hits(
            &l,
            &SocketFacts {
                cgroup: Some(""),
                ..facts()
            }
        ));
        assert!(!hits(&l, &facts()));
    }

    #[test]
    fn uid_and_user() {
        let l = one_rule("uid = 33");
        assert!(hits(&l, &facts()));
        assert!(!hits(&l, &SocketFacts { uid: 0, ..facts() }));
        assert!(!l.needs_user());
        let l = one_rule("user = \"www-data\"");
        assert!(hits(&l, &facts()));
        assert!(!hits(
            &l,
            &SocketFacts {
                user: Some("root"),
                ..facts()
            }
        ));
        assert!(
            !hits(
                &l,
                &SocketFacts {
                    user: None,
                    ..facts()
                }
            ),
            "unknown user never matches"
        );
        assert!(l.needs_user());
    }

    #[test]
    fn ports() {
        let l = one_rule("local_port = 443");
        assert!(hits(&l, &facts()));
        assert!(!hits(
            &l,
            &SocketFacts {
                local_port: 444,
                ..facts()
            }
        ));
        let l = one_rule("remote_port = \"50000-52000\"");
        assert!(hits(&l, &facts()));
        assert!(hits(
            &l,
            &SocketFacts {
                remote_port: 50000,
                ..facts()
            }
        ));
        assert!(hits(
            &l,
            &SocketFacts {
                remote_port: 52000,
                ..facts()
            }
        ));
        assert!(!hits(
            &l,
            &SocketFacts {
                remote_port: 52001,
                ..facts()
            }
        ));
        // Port 0 (unknown) never matches, even a range starting at 0.
        let l = one_rule("local_port = \"0-1023\"");
        assert!(!hits(
            &l,
            &SocketFacts {
                local_port: 0,
                ..facts()
            }
        ));
        assert!(hits(
            &l,
            &SocketFacts {
                local_port: 22,
                ..facts()
            }
        ));
    }

    #[test]
    fn remote_cidr() {
        let l = one_rule("remote_cidr = [\"10.0.0.0/8\", \"fd00::/8\", \"192.0.2.7\"]");
        let with = |a: IpAddr| SocketFacts {
            remote_addr: Some(a),
            ..facts()
        };
        assert!(hits(&l, &facts()));
        assert!(hits(&l, &with("fd12::1".parse().unwrap())));
        assert!(hits(&l, &with("192.0.2.7".parse().unwrap())));
        assert!(
            !hits(&l, &with("192.0.2.8".parse().unwrap())),
            "bare address is a /32"
        );
        assert!(!hits(&l, &with("11.0.0.1".parse().unwrap())));
        assert!(!hits(&l, &with("2001:db8::1".parse().unwrap())));
        assert!(
            !hits(
                &l,
                &SocketFacts {
                    remote_addr: None,
                    ..facts()
                }
            ),
            "no remote address never matches"
        );
    }

    #[test]
    fn v4_mapped_matches_v4_cidr() {
        let l = one_rule("remote_cidr = \"10.0.0.0/8\"");
        let mapped = Ipv4Addr::new(10, 9, 8, 7).to_ipv6_mapped();
        assert!(hits(
            &l,
            &SocketFacts {
                remote_addr: Some(IpAddr::V6(mapped)),
                ..facts()
            }
        ));
        let other = Ipv4Addr::new(11, 0, 0, 1).to_ipv6_mapped();
        assert!(!hits(
            &l,
            &SocketFacts {
                remote_addr: Some(IpAddr::V6(other)),
                ..facts()
            }
        ));
        // A v6 network written in mapped form still matches the mapped address as is.
        let l = one_rule("remote_cidr = \"::ffff:0:0/96\"");
        assert!(hits(
            &l,
            &SocketFacts {
                remote_addr: Some(IpAddr::V6(mapped)),
                ..facts()
            }
        ));
        // ::a.b.c.d style addresses that are not mapped do not count as v4.
        let l = one_rule("remote_cidr = \"0.0.0.0/0\"");
        let not_mapped = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0x0a09, 0x0807);
        assert!(!hits(
            &l,
            &SocketFacts {
                remote_addr: Some(IpAddr::V6(not_mapped)),
                ..facts()
            }
        ));
    }

    #[test]
    fn protocol() {
        let l = one_rule("protocol = \"udp\"");
        assert!(!hits(&l, &facts()));
        assert!(hits(
            &l,
            &SocketFacts {
                protocol: 17,
                ..facts()
            }
        ));
        let l = one_rule("protocol = \"icmp\"");
        assert!(hits(
            &l,
            &SocketFacts {
                protocol: 1,
                ..facts()
            }
        ));
        assert!(hits(
            &l,
            &SocketFacts {
                protocol: 58,
                ..facts()
            }
        ));
        assert!(!hits(&l, &facts()));
        let l = one_rule("protocol = 6");
        assert!(hits(&l, &facts()));
    }

    #[test]
    fn netns() {
        let l = one_rule("netns = \"host\"");
        assert!(hits(&l, &facts()));
        assert!(!hits(
            &l,
            &SocketFacts {
                netns_cookie: 7,
                ..facts()
            }
        ));
        let l = one_rule("netns = \"other\"");
        assert!(!hits(&l, &facts()));
        assert!(hits(
            &l,
            &SocketFacts {
                netns_cookie: 7,
                ..facts()
            }
        ));
        let l = one_rule("netns = 7");
        assert!(hits(
            &l,
            &SocketFacts {
                netns_cookie: 7,
                ..facts()
            }
        ));
        assert!(!hits(&l, &facts()));
    }

    #[test]
    fn placeholders() {
        let l = one_rule("");
        assert_eq!(l.label(&facts()), "hit");
        let l = labeler(
            "[[rule]]\nlabel = \"{process}|{exe}|{cgroup}|{uid}|{user}|{local_port}|{remote_port}|{{x}}\"\n",
        );
        assert_eq!(
            l.label(&facts()),
            "nginx|nginx|system.slice/nginx.service|33|www-data|443|51000|{x}"
        );
        assert!(l.needs_exe() && l.needs_cgroup() && l.needs_user());
        // Missing facts still give something readable, never "".
        let bare = SocketFacts {
            process: "",
            exe: None,
            cgroup: None,
            user: None,
            local_port: 0,
            remote_port: 0,
            ..facts()
        };
        assert_eq!(l.label(&bare), "unknown|unknown|unknown|33|33|0|0|{x}");
        assert_eq!(
            l.label(&SocketFacts {
                cgroup: Some(""),
                ..facts()
            })
            .split('|')
            .nth(2),
            Some("/")
        );
    }

    #[test]
    fn default_label_modes() {
        let f = facts();
        assert_eq!(labeler("default_label = \"process\"").label(&f), "nginx");
        assert_eq!(labeler("default_label = \"exe\"").label(&f), "nginx");
        assert_eq!(
            labeler("default_label = \"exe\"").label(&SocketFacts {
                exe: Some("/usr/bin/python3.12"),
                ..f
            }),
            "python3.12"
        );
        assert_eq!(
            labeler("default_label = \"cgroup\"").label(&f),
            "system.slice/nginx.service"
        );
        assert_eq!(labeler("default_label = \"user\"").label(&f), "www-data");
        assert_eq!(
            labeler("default_label = \"user\"").label(&SocketFacts { user: None, ..f }),
            "33"
        );
        assert!(labeler("default_label = \"exe\"").needs_exe());
        assert!(labeler("default_label = \"cgroup\"").needs_cgroup());
        assert!(labeler("default_label = \"user\"").needs_user());
    }

    #[test]
    fn never_empty() {
        let empty = SocketFacts {
            process: "",
            exe: None,
            cgroup: None,
            user: None,
            ..facts()
        };
        for mode in ["process", "exe", "cgroup"] {
            let l = labeler(&format!("default_label = {mode:?}"));
            assert_eq!(l.label(&empty), "unknown", "{mode}");
        }
        assert_eq!(
            labeler("default_label = \"exe\"").label(&SocketFacts {
                exe: Some(""),
                ..empty
            }),
            "unknown"
        );
        assert_eq!(
            labeler("default_label = \"cgroup\"").label(&SocketFacts {
                cgroup: Some(""),
                ..empty
            }),
            "/"
        );
        assert_eq!(labeler("default_label = \"user\"").label(&empty), "33");
        assert_eq!(truncate_label(String::new()), "unknown");
    }

    #[test]
    fn long_labels_are_cut_at_a_char_boundary() {
        let l = labeler("[[rule]]\nlabel = \"{process}\"\n");
        let name = "é".repeat(100); // 200 bytes
        let got = l.label(&SocketFacts {
            process: &name,
            ..facts()
        });
        assert_eq!(got.len(), 128);
        assert_eq!(got, "é".repeat(64));
        let name = format!("a{}", "é".repeat(100)); // cut falls inside a char
        let got = l.label(&SocketFacts {
            process: &name,
            ..facts()
        });
        assert_eq!(got.len(), 127);
        assert!(got.starts_with('a'));
        let exact = "x".repeat(128);
        assert_eq!(
            l.label(&SocketFacts {
                process: &exact,
                ..facts()
            }),
            exact
        );
    }

    #[test]
    fn labels_are_arbitrary_utf8() {
        let l = labeler("[[rule]]\nlabel = \"Веб 🌐 {local_port}\"\n");
        assert_eq!(l.label(&facts()), "Веб 🌐 443");
    }

    #[test]
    fn new_rejects_bad_config_built_in_code() {
        let cfg = Config {
            rules: vec![
                Rule {
                    label: "ok".into(),
                    ..Rule::default()
                },
                Rule {
                    label: "x".into(),
                    cgroup: Some("system.slice/[".into()),
                    ..Rule::default()
                },
            ],
            ..Config::default()
        };
        let e = Labeler::new(&cfg, HOST_NS).unwrap_err();
        assert_eq!((e.rule(), e.field_name()), (Some(2), Some("cgroup")));
        assert!(
            e.to_string().starts_with(
                "config: rule #2 field cgroup: \"system.slice/[\" is not a valid glob"
            ),
            "{e}"
        );
        let cfg = Config {
            rules: vec![Rule::default()],
            ..Config::default()
        };
        let e = Labeler::new(&cfg, HOST_NS).unwrap_err();
        assert_eq!((e.rule(), e.field_name()), (Some(1), Some("label")));
        assert!(e.to_string().contains("label is empty"), "{e}");
    }

    #[test]
    fn example_config_labels() {
        let cfg = Config::parse(include_str!("../../docs/config.example.toml"), "example").unwrap();
        let l = Labeler::new(&cfg, HOST_NS).unwrap();
        assert_eq!(l.label(&facts()), "nginx");
        let ssh = SocketFacts {
            process: "sshd",
            exe: Some("/usr/sbin/sshd"),
            cgroup: Some("system.slice/ssh.service"),
            uid: 0,
            user: Some("root"),
            local_port: 22,
            ..facts()
        };
        assert_eq!(l.label(&ssh), "ssh");
        let dns = SocketFacts {
            process: "systemd-resolve",
            protocol: 17,
            remote_port: 53,
            remote_addr: Some("8.8.8.8".parse().unwrap()),
            ..ssh
        };
        assert_eq!(l.label(&dns), "dns");
        let container = SocketFacts {
            process: "python3",
            exe: Some("/usr/bin/python3"),
            cgroup: Some("system.slice/docker-abc.scope"),
            netns_cookie: 99,
            ..ssh
        };
        assert_eq!(l.label(&container), "container:python3");
    }

    #[test]
    fn template_parsing() {
        let t = Template::parse("a{{b}}{uid}c").unwrap();
        assert_eq!(
            t.pieces,
            vec![
                Piece::Text("a{b}".into()),
                Piece::Fact(Fact::Uid),
                Piece::Text("c".into())
            ]
        );
        assert!(
            Template::parse("{}")
                .unwrap_err()
                .contains("unknown placeholder {}")
        );
        assert!(Template::parse("{ process }").is_err());
        assert!(Template::parse(&"y".repeat(128)).is_ok());
        assert!(Template::parse(&format!("{}{{process}}", "y".repeat(128))).is_ok());
        assert!(Template::parse(&"y".repeat(129)).is_err());
    }
}
