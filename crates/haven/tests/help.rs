//! The help texts of the real binary say what the README says they say.

mod common;

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(common::haven_bin())
        .args(args)
        .arg("--help")
        .env_remove("HAVEN_ADMIN_TOKEN")
        .output()
        .expect("running haven");
    assert!(out.status.success(), "haven {args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The flags under `heading` in a help text (up to the next heading).
fn flags_under(text: &str, heading: &str) -> Vec<String> {
    let mut lines = text.lines().skip_while(|l| *l != format!("{heading}:"));
    assert!(lines.next().is_some(), "no {heading:?} heading in:\n{text}");
    lines
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .filter_map(|l| {
            let l = l.trim_start();
            l.starts_with("--")
                .then(|| l.split([' ', '<']).next().unwrap().to_owned())
        })
        .collect()
}

#[test]
fn serve_help_groups_its_flags_under_headings() {
    let text = help(&["serve"]);
    let cluster = flags_under(&text, "Cluster mode");
    for f in ["--store", "--store-replicas", "--region", "--drain-timeout"] {
        assert!(
            cluster.iter().any(|c| c == f),
            "{f} not under Cluster mode: {cluster:?}"
        );
    }
    let regions = flags_under(&text, "Multi-region");
    for f in ["--peer-regions", "--region-check-interval"] {
        assert!(
            regions.iter().any(|c| c == f),
            "{f} not under Multi-region: {regions:?}"
        );
    }
    for (heading, flag) in [
        ("HTTP", "--listen"),
        ("Admin API", "--admin-token-file"),
        ("TLS", "--tls-cert"),
        ("Logs, traces and metrics", "--log-level"),
        ("Backup", "--backup-url"),
        ("Authentication", "--oauth-issuer"),
        ("Secrets", "--secrets-key-file"),
    ] {
        let flags = flags_under(&text, heading);
        assert!(
            flags.iter().any(|c| c == flag),
            "{flag} not under {heading}: {flags:?}"
        );
    }
    // The admin token may be given itself, in the environment.
    let admin = text.split("Admin API:").nth(1).unwrap();
    assert!(
        admin.contains("HAVEN_ADMIN_TOKEN,") || admin.contains("HAVEN_ADMIN_TOKEN "),
        "{admin}"
    );
}

#[test]
fn secrets_help_names_every_subcommand() {
    let sub = help(&["secrets"]);
    for cmd in [
        "set",
        "list",
        "delete",
        "rotate-key",
        "keys",
        "retire-key",
        "new-key",
    ] {
        assert!(
            sub.lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "{cmd} missing from haven secrets --help:\n{sub}"
        );
    }
    // The summary in `haven --help` names them all too.
    let top = help(&[]).split_whitespace().collect::<Vec<_>>().join(" ");
    let summary = top
        .split(" secrets ")
        .nth(1)
        .and_then(|s| s.split(" region ").next())
        .expect("secrets in haven --help");
    for cmd in ["rotate-key", "keys", "retire-key", "new-key"] {
        assert!(summary.contains(cmd), "{cmd} missing from {summary:?}");
    }
}

#[test]
fn admin_token_defaults_read_the_same_everywhere() {
    let expected = "[default: HAVEN_ADMIN_TOKEN, else DATA/admin.token]";
    for cmd in [
        &["backup", "list"][..],
        &["registry", "list"],
        &["config", "list"],
        &["status"],
    ] {
        let text = help(cmd).split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(text.contains(expected), "haven {cmd:?} --help:\n{text}");
    }
}

#[test]
fn stdio_help_says_it_needs_a_data_directory_of_its_own() {
    let text = help(&["stdio"])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(text.contains("a --data of its own"), "{text}");
}
