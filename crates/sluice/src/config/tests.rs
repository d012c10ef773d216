//! The configuration's defaults, its errors (each naming file, key and reason) and the documented example.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("sluice.toml"), &with_env(&[]))
}

/// Overrides whose environment holds only `vars`.
fn with_env(vars: &[(&str, &str)]) -> Overrides {
    Overrides {
        env: Some(
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Overrides::default()
    }
}

#[test]
fn defaults_serve_sim_on_loopback() {
    let c = Config::defaults(&Overrides::default()).expect("defaults");
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.data_dir, PathBuf::from("sluice-data"));
    assert_eq!(c.models.len(), 1);
    assert!(c.model("sim").is_some());
}

#[test]
fn the_issue_example_parses() {
    let c = Config::parse(
        r#"
listen = "127.0.0.1:9999"
[[models]]
name = "local"
kind = "openai"
base_url = "http://127.0.0.1:9000/v1"
api_key_env = "SLUICE_TEST_KEY_1"
first_token_timeout_ms = 30000
idle_timeout_ms = 30000
total_timeout_ms = 600000

[[models]]
name = "slow-sim"
kind = "sim"
sim = { first_token_ms = 2000, token_interval_ms = 20, tokens = 40 }
on_disconnect = { grace_ms = 5000 }
"#,
        Path::new("sluice.toml"),
        &with_env(&[("SLUICE_TEST_KEY_1", "sk-test")]),
    )
    .expect("valid");
    assert_eq!(
        c.model("slow-sim").map(|m| m.on_disconnect),
        Some(OnDisconnect::GraceMs(5000))
    );
    assert_eq!(
        c.model("local").map(|m| m.on_disconnect),
        Some(OnDisconnect::Cancel)
    );
    assert_eq!(c.listen.port(), 9999);
    assert_eq!(c.models.len(), 3, "local, slow-sim and the built-in sim");
    let slow = c.model("slow-sim").expect("slow-sim");
    assert!(matches!(
        slow.upstream,
        Upstream::Sim(SimDefaults {
            first_token_ms: 2000,
            tokens: 40,
            ..
        })
    ));
    let local = c.model("local").expect("local");
    assert_eq!(local.timeouts.total, Duration::from_secs(600));
    assert!(
        !format!("{:?}", local.upstream).contains("sk-test"),
        "the key never shows in Debug"
    );
}

#[test]
fn errors_name_the_file_the_key_and_the_reason() {
    // Each bad config, and what its error must say.
    let cases: &[(&str, &[&str])] = &[
        ("lisen = \"x\"", &["unknown field"]),
        (
            "[[models]]\nname = \"a\"\nkind = \"openai\"\nidle_timeout_ms = \"soon\"\n",
            &["key `models[0].idle_timeout_ms`", "line 4"],
        ),
        (
            "[[models]]\nname = \"a\"\nkind = \"openai\"\n",
            &["key `models[0].base_url`: is required"],
        ),
        ("[[models]]\nname = \"a\"\nkind = \"grpc\"\n", &["models[0].kind"]),
        (
            "[[models]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://[::1\"\n",
            &["key `models[0].base_url`", "not a valid URL"],
        ),
        (
            "[[models]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://x\"\napi_key_env = \"SLUICE_TEST_SURELY_UNSET\"\n",
            &["SLUICE_TEST_SURELY_UNSET is not set"],
        ),
        ("idle = [", &["sluice.toml"]),
        (
            "[[models]]\nname = \"a\"\nkind = \"sim\"\n[[models]]\nname = \"a\"\nkind = \"sim\"\n",
            &["models[1].name"],
        ),
        (
            "slow_client_timeout_ms = 0",
            &["slow_client_timeout_ms`: must be greater than 0"],
        ),
        (
            "max_body_bytes = 16777217",
            &["max_body_bytes`: must be at most 16777216"],
        ),
        (
            "max_event_bytes = 1073741824",
            &["max_event_bytes`: must be at most 16777216", "journal"],
        ),
        (
            "[[models]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://x\"\nhttp_version = \"3\"\n",
            &["models[0].http_version", "`auto`, `1.1`, `2`"],
        ),
        (
            "[[models]]\nname = \"a\"\nkind = \"sim\"\nhttp_version = \"2\"\n",
            &["models[0].http_version", "only applies to kind = \"openai\""],
        ),
    ];
    for (text, expected) in cases {
        let e = parse(text).expect_err(text).to_string();
        for part in *expected {
            assert!(e.contains(part), "{text:?}: {e}");
        }
    }
    let largest = parse("max_body_bytes = 16777216\nmax_event_bytes = 16777216")
        .expect("the largest allowed");
    assert_eq!(largest.max_body_bytes, MAX_RECORDED_BYTES);
    let e = parse("lisen = \"x\"").expect_err("unknown key").to_string();
    assert!(e.starts_with("config file sluice.toml: key `lisen`"), "{e}");
}

#[test]
fn an_upstream_speaks_the_http_version_it_is_given() {
    use crate::upstream::pool::HttpVersion;
    for (line, version) in [
        ("", HttpVersion::Auto),
        ("http_version = \"auto\"", HttpVersion::Auto),
        ("http_version = \"1.1\"", HttpVersion::Http1),
        ("http_version = \"2\"", HttpVersion::Http2),
    ] {
        let c = parse(&format!(
            "[[models]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://x/v1\"\n{line}\n"
        ))
        .expect(line);
        match &c.model("a").expect("a").upstream {
            Upstream::OpenAi(upstream) => assert_eq!(upstream.version(), version, "{line}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn overrides_win_over_the_file() {
    let o = Overrides {
        listen: Some("127.0.0.1:1".parse().expect("addr")),
        data_dir: Some("elsewhere".into()),
        ..Overrides::default()
    };
    let c = Config::parse(
        "listen = \"127.0.0.1:2\"\ndata_dir = \"here\"",
        Path::new("f"),
        &o,
    )
    .expect("valid");
    assert_eq!(c.listen.port(), 1);
    assert_eq!(c.data_dir, PathBuf::from("elsewhere"));
}

#[test]
fn the_documented_example_config_is_valid() {
    let text = include_str!("../../../../docs/sluice.example.toml");
    let c = Config::parse(
        text,
        Path::new("docs/sluice.example.toml"),
        &with_env(&[("LOCAL_API_KEY", "sk-example")]),
    )
    .expect("docs/sluice.example.toml must parse");
    assert!(c.model("local").is_some() && c.model("slow-sim").is_some());
}

#[test]
fn keys_hold_hashes_with_optional_limits() {
    let key = crate::auth::new_key().expect("random");
    let text = format!(
        "{}max_concurrent_streams = 2\n",
        crate::auth::config_lines("acme", &key).replace("# max_concurrent_streams = 16\n", "")
    );
    let c = parse(&text).expect("valid");
    assert_eq!(c.keys.len(), 1);
    assert_eq!(c.keys[0].key_sha256, crate::auth::hash_key(&key));
    assert_eq!(c.keys[0].max_concurrent_streams, Some(2));
    let e = parse("[[keys]]\ntenant = \"a\"\nkey_sha256 = \"sk-plain-key\"\n")
        .expect_err("not a hash")
        .to_string();
    assert!(e.contains("keys[0].key_sha256"), "{e}");
}

#[test]
fn a_missing_file_is_named() {
    let e = Config::load(
        Some(Path::new("/nonexistent/sluice.toml")),
        &Overrides::default(),
    )
    .expect_err("missing")
    .to_string();
    assert!(
        e.starts_with("config file /nonexistent/sluice.toml: cannot read it"),
        "{e}"
    );
}

#[test]
fn store_retention_is_in_hours_and_off_by_default() {
    assert_eq!(parse("").expect("empty").retention, None);
    let c = parse("[store]\nretention_hours = 720\n").expect("valid");
    assert_eq!(c.retention, Some(Duration::from_secs(720 * 3600)));
    let err = parse("[store]\nretention_hours = 0\n")
        .expect_err("zero")
        .to_string();
    assert!(err.contains("store.retention_hours"), "{err}");
}
