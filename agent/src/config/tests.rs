//! The config file's parser and checks: what is accepted, and how errors are located.
use super::*;

fn err(text: &str) -> ConfigError {
    Config::parse(text, "test.toml").expect_err("config should be rejected")
}

#[track_caller]
fn assert_err(text: &str, line: usize, rule: Option<usize>, field: Option<&str>, needles: &[&str]) {
    check_err(err(text), line, rule, field, needles)
}

/// Asserts the error's structured location (in test.toml) and that its message
/// mentions every `needle`.
#[track_caller]
pub(crate) fn check_err(
    e: ConfigError,
    line: usize,
    rule: Option<usize>,
    field: Option<&str>,
    needles: &[&str],
) {
    let msg = e.to_string();
    assert_eq!(e.line(), Some(line), "line in {msg}");
    assert_eq!(e.rule(), rule, "rule in {msg}");
    assert_eq!(e.field_name(), field, "field in {msg}");
    assert!(
        msg.starts_with(&format!("config test.toml:{line}: ")),
        "{msg}"
    );
    if let Some(r) = rule {
        assert!(msg.contains(&format!("rule #{r}")), "{msg}");
    }
    if let Some(f) = field {
        assert!(msg.contains(&format!("field {f}")), "{msg}");
    }
    for n in needles {
        assert!(msg.contains(n), "{msg:?} should contain {n:?}");
    }
    assert!(!msg.contains('\n'), "one line: {msg:?}");
}

#[test]
fn errors_name_the_key_and_what_is_allowed() {
    assert_err(
        "[spool]\nfsync = -5\n",
        2,
        None,
        Some("spool"),
        &[
            "-5 is not an fsync policy",
            r#""always", "never" or milliseconds"#,
        ],
    );
    assert_err(
        "[spool]\nfsync = [1]\n",
        2,
        None,
        Some("spool"),
        &[r#"expected "always", "never" or milliseconds"#],
    );
    assert_err(
        "interval_ms = 99999999999999999999999\n",
        1,
        None,
        Some("interval_ms"),
        &["too large"],
    );
}

#[test]
fn empty_file_gives_defaults() {
    let c = Config::parse("", "empty.toml").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.interval_ms, 100);
    assert_eq!(c.max_sockets, 262_144);
    assert_eq!(c.default_label, DefaultLabel::Process);
    assert!(c.rules.is_empty() && c.interfaces.is_empty());
    assert!(c.cgroup.is_none() && c.agent_id.is_none());
}

#[test]
fn full_config() {
    let text = r#"
interval_ms = 250
cgroup = "/sys/fs/cgroup/system.slice"
interfaces = ["eth0", "wg0"]
max_sockets = 4096
agent_id = "web-01"
default_label = "cgroup"

[[rule]]
label = "nginx"
process = "nginx"
exe = "/usr/sbin/nginx"
cgroup = "system.slice/nginx.service"
uid = 33
user = "www-data"
local_port = 443
remote_port = "1024-65535"
remote_cidr = "10.0.0.0/8"
protocol = "tcp"
netns = "host"

[[rule]]
label = "dns-{process}"
remote_cidr = ["192.168.1.1", "fd00::/8", "2001:db8::1"]
remote_port = "53"
protocol = 17
netns = 4096

[[rule]]
label = "containers"
netns = "other"
protocol = "ICMP"
"#;
    let c = Config::parse(text, "full.toml").unwrap();
    assert_eq!(c.interval_ms, 250);
    assert_eq!(
        c.cgroup.as_deref(),
        Some(Path::new("/sys/fs/cgroup/system.slice"))
    );
    assert_eq!(c.interfaces, ["eth0", "wg0"]);
    assert_eq!(c.max_sockets, 4096);
    assert_eq!(c.agent_id.as_deref(), Some("web-01"));
    assert_eq!(c.default_label, DefaultLabel::Cgroup);
    assert_eq!(c.rules.len(), 3);
    let r = &c.rules[0];
    assert_eq!(r.label, "nginx");
    assert_eq!(r.process.as_deref(), Some("nginx"));
    assert_eq!(r.exe.as_deref(), Some("/usr/sbin/nginx"));
    assert_eq!(r.cgroup.as_deref(), Some("system.slice/nginx.service"));
    assert_eq!(r.uid, Some(33));
    assert_eq!(r.user.as_deref(), Some("www-data"));
    assert_eq!(
        r.local_port,
        Some(PortRange {
            start: 443,
            end: 443
        })
    );
    assert_eq!(
        r.remote_port,
        Some(PortRange {
            start: 1024,
            end: 65535
        })
    );
    assert_eq!(r.remote_cidr, Some(vec!["10.0.0.0/8".parse().unwrap()]));
    assert_eq!(r.protocol, Some(Protocol::Tcp));
    assert_eq!(r.netns, Some(Netns::Host));
    assert!(!r.is_catch_all());
    let r = &c.rules[1];
    assert_eq!(
        r.remote_cidr,
        Some(vec![
            "192.168.1.1/32".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
            "2001:db8::1/128".parse().unwrap()
        ])
    );
    assert_eq!(r.remote_port, Some(PortRange { start: 53, end: 53 }));
    assert_eq!(r.protocol, Some(Protocol::Number(17)));
    assert_eq!(r.netns, Some(Netns::Cookie(4096)));
    assert_eq!(c.rules[2].netns, Some(Netns::Other));
    assert_eq!(c.rules[2].protocol, Some(Protocol::Icmp));
}

#[test]
fn example_config_parses() {
    let c = Config::parse(
        include_str!("../../../docs/config.example.toml"),
        "config.example.toml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(c.rules.len() >= 5);
    // A catch-all anywhere but last would shadow the rules after it.
    let last = c.rules.len() - 1;
    assert!(c.rules[..last].iter().all(|r| !r.is_catch_all()));
}

#[test]
fn default_label_modes() {
    for (text, want) in [
        ("process", DefaultLabel::Process),
        ("exe", DefaultLabel::Exe),
        ("cgroup", DefaultLabel::Cgroup),
        ("user", DefaultLabel::User),
    ] {
        let c = Config::parse(&format!("default_label = {text:?}"), "t").unwrap();
        assert_eq!(c.default_label, want);
    }
    assert_err(
        "\ndefault_label = \"pid\"",
        2,
        None,
        Some("default_label"),
        &[
            "unknown variant `pid`",
            "`process`",
            "`exe`",
            "`cgroup`",
            "`user`",
        ],
    );
}

#[test]
fn rule_tables_inline_and_single_cidr() {
    let c = Config::parse(r#"rule = [{ label = "a", remote_cidr = "::1" }]"#, "t").unwrap();
    assert_eq!(
        c.rules[0].remote_cidr,
        Some(vec!["::1/128".parse().unwrap()])
    );
}

#[test]
fn unknown_keys_are_named() {
    assert_err(
        "interval_ms = 100\nintervall = 5\n",
        2,
        None,
        None,
        &["unknown field `intervall`", "interval_ms"],
    );
    assert_err(
        "[[rule]]\nlabel = \"a\"\n\n[[rule]]\nlabel = \"b\"\nproces = \"x\"\n",
        6,
        Some(2),
        None,
        &["unknown field `proces`", "`process`"],
    );
    assert_err(
        "[[rule]]\nlabel = \"a\"\n\n[other]\nx = 1\n",
        4,
        None,
        None,
        &["unknown field `other`"],
    );
}

#[test]
fn type_errors_name_rule_and_field() {
    assert_err(
        "[[rule]]\nlabel = \"a\"\n[[rule]]\nlabel = \"b\"\nuid = \"root\"\n",
        5,
        Some(2),
        Some("uid"),
        &["invalid type: string \"root\", expected u32"],
    );
    assert_err(
        "[[rule]]\nuid = 1\n",
        1,
        Some(1),
        None,
        &["missing field `label`"],
    );
    assert_err(
        "interval_ms = \"fast\"",
        1,
        None,
        Some("interval_ms"),
        &["expected u64"],
    );
    assert_err(
        "[rule]\nlabel = \"a\"\n",
        1,
        None,
        Some("rule"),
        &["[[rule]]"],
    );
}

#[test]
fn syntax_error_has_line() {
    let e = err("interval_ms = 100\nx = [\n");
    assert_eq!(e.line(), Some(2));
    assert!(!e.to_string().contains('\n'), "{e}");
}

#[test]
fn interval_range() {
    assert_err(
        "\ninterval_ms = 5",
        2,
        None,
        Some("interval_ms"),
        &["5 is out of range", "10..=60000"],
    );
    assert_err(
        "interval_ms = 60001",
        1,
        None,
        Some("interval_ms"),
        &["out of range"],
    );
    Config::parse("interval_ms = 10", "t").unwrap();
    Config::parse("interval_ms = 60000", "t").unwrap();
}

#[test]
fn top_level_checks() {
    assert_err(
        "max_sockets = 100",
        1,
        None,
        Some("max_sockets"),
        &["100 is too small", "at least 1024"],
    );
    assert_err(
        "cgroup = \"system.slice\"",
        1,
        None,
        Some("cgroup"),
        &["not an absolute path", "/sys/fs/cgroup"],
    );
    assert_err(
        "interfaces = [\"eth0\", \"a/b\"]",
        1,
        None,
        Some("interfaces"),
        &["\"a/b\" is not a valid interface name", "\"eth0\""],
    );
    assert_err(
        "interfaces = [\"thisnameistoolong0\"]",
        1,
        None,
        Some("interfaces"),
        &["not a valid interface name"],
    );
    assert_err(
        "interfaces = [\"eth0\", \"eth0\"]",
        1,
        None,
        Some("interfaces"),
        &["listed twice"],
    );
    assert_err("agent_id = \"\"", 1, None, Some("agent_id"), &["empty"]);
}

#[test]
fn bad_ports() {
    let cases = [
        ("\"8100-8000\"", "start is greater than end"),
        ("\"8000-70000\"", "70000 is greater than 65535"),
        ("70000", "70000 is not a valid port"),
        ("0", "port 0 means unknown"),
        ("-1", "-1 is not a valid port"),
        ("\"http\"", "\"http\" is not a number"),
        ("\"80-\"", "is not a number"),
        ("true", "expected a port number 1-65535 or a range string"),
    ];
    for (value, needle) in cases {
        for field in ["local_port", "remote_port"] {
            let text =
                format!("[[rule]]\nlabel = \"a\"\n[[rule]]\nlabel = \"b\"\n{field} = {value}\n");
            assert_err(&text, 5, Some(2), Some(field), &[needle, "expected"]);
        }
    }
}

#[test]
fn port_ranges_parse() {
    assert_eq!(
        PortRange::parse("80").unwrap(),
        PortRange { start: 80, end: 80 }
    );
    assert_eq!(
        PortRange::parse("8000 - 8100").unwrap(),
        PortRange {
            start: 8000,
            end: 8100
        }
    );
    assert_eq!(
        PortRange::parse("0-1023").unwrap(),
        PortRange {
            start: 0,
            end: 1023
        }
    );
    assert!(PortRange::parse("0").is_err());
    let r = PortRange { start: 0, end: 10 };
    assert!(!r.contains(0), "port 0 is unknown and never matches");
    assert!(r.contains(1) && r.contains(10) && !r.contains(11));
}

#[test]
fn bad_protocol_and_netns() {
    assert_err(
        "[[rule]]\nlabel = \"a\"\nprotocol = \"sctp\"\n",
        3,
        Some(1),
        Some("protocol"),
        &[
            r#"unknown protocol "sctp""#,
            r#""tcp", "udp", "icmp" or a protocol number 0-255"#,
        ],
    );
    assert_err(
        "[[rule]]\nlabel = \"a\"\nprotocol = 300\n",
        3,
        Some(1),
        Some("protocol"),
        &["300 is not a protocol number"],
    );
    assert_err(
        "[[rule]]\nlabel = \"a\"\nnetns = \"guest\"\n",
        3,
        Some(1),
        Some("netns"),
        &[r#"unknown netns "guest""#, r#""host", "other""#],
    );
    assert_err(
        "[[rule]]\nlabel = \"a\"\nnetns = -3\n",
        3,
        Some(1),
        Some("netns"),
        &["not a netns cookie"],
    );
    let c = Config::parse(
        "[[rule]]\nlabel = \"a\"\nnetns = \"18446744073709551615\"\nprotocol = \"132\"",
        "t",
    )
    .unwrap();
    assert_eq!(c.rules[0].netns, Some(Netns::Cookie(u64::MAX)));
    assert_eq!(c.rules[0].protocol, Some(Protocol::Number(132)));
}

#[test]
fn protocol_matching() {
    assert!(Protocol::Tcp.matches(6) && !Protocol::Tcp.matches(17));
    assert!(Protocol::Udp.matches(17));
    assert!(Protocol::Icmp.matches(1) && Protocol::Icmp.matches(58) && !Protocol::Icmp.matches(6));
    assert!(Protocol::Number(132).matches(132) && !Protocol::Number(132).matches(6));
}

#[test]
fn error_messages_without_a_file() {
    let e = ConfigError::rule_field(1, "remote_cidr", "bad");
    assert_eq!(e.to_string(), "config: rule #2 field remote_cidr: bad");
    let e = ConfigError::field("interval_ms", "bad").located("/etc/sockacct.toml", None);
    assert_eq!(
        e.to_string(),
        "config /etc/sockacct.toml: field interval_ms: bad"
    );
}

#[test]
fn load_names_the_file() {
    let dir = std::env::temp_dir().join(format!("sockacct-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sockacct.toml");
    std::fs::write(
        &path,
        "[[rule]]\nlabel = \"a\"\nremote_cidr = \"10.0.0.0/33\"\n",
    )
    .unwrap();
    let msg = Config::load(&path).unwrap_err().to_string();
    assert_eq!(
        msg,
        format!(
            r#"config {}:3: rule #1 field remote_cidr: "10.0.0.0/33" is not a valid CIDR (expected e.g. "10.0.0.0/8" or "fd00::/8")"#,
            path.display()
        )
    );
    std::fs::write(&path, "interval_ms = 200\n").unwrap();
    assert_eq!(Config::load(&path).unwrap().interval_ms, 200);
    std::fs::remove_dir_all(&dir).unwrap();
    let e = Config::load(&dir.join("missing.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().contains("missing.toml: cannot read"), "{e}");
}

mod upload_format {
    use super::*;

    #[test]
    fn clickhouse_upload_settings_are_checked() {
        for good in ["sockacct.records", "records"] {
            assert!(is_table_name(good), "{good}");
        }
        for bad in ["", "a.b.c", "x;DROP", "1t", "a b", "db."] {
            assert!(!is_table_name(bad), "{bad}");
        }
        let e = Config::parse(
            "[upload]\nformat = \"clickhouse\"\nurl = \"http://h:8123/?query=INSERT\"\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("upload.url") && e.contains("builds the INSERT"),
            "{e}"
        );
        let e = Config::parse(
            "[upload]\nformat = \"clickhouse\"\ntable = \"a;b\"\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("upload.table"), "{e}");
        let c = Config::parse(
            "[upload]\nformat = \"clickhouse\"\nurl = \"http://h:8123/\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.upload.format, UploadFormat::Clickhouse);
    }
}

// [spool] memory backlog: bounded in bytes; the old key in records is accepted and ignored.
#[test]
fn spool_memory_backlog_is_in_bytes_and_the_old_key_still_parses() {
    let c = Config::parse("[spool]\nmemory_backlog_bytes = 1048576\n", "t").unwrap();
    assert_eq!(c.spool.memory_backlog_bytes, 1 << 20);
    let c = Config::parse("[spool]\nmemory_backlog = 5000\n", "t").unwrap();
    assert_eq!(
        c.spool.memory_backlog_bytes,
        crate::spool::DEFAULT_MEMORY_BACKLOG_BYTES
    );
    let e = Config::parse("[spool]\nmemory_backlog_bytes = 10\n", "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("memory_backlog_bytes 10 is too small"), "{e}");
}
