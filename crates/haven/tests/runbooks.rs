//! The runbooks (`docs/runbooks/`) and the README's `sh` blocks stay true: every `haven ...`
//! command line in them parses with this CLI (its subcommand path exists and every flag used
//! is in that subcommand's `--help`), their links resolve (the alert rules' `runbook_url`
//! anchors too), and the restore runbook is performed as written against a local node
//! (embedded store, backup to a local directory).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Haven, free_port, stateless};
use haven_state::{HybridClock, Origin, RedbStore, Store};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn runbook_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("docs/runbooks"))
        .expect("docs/runbooks")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    files
}

/// The logical lines of each fenced `sh` block of `md` (continuation lines joined; blank lines
/// and comment lines left out).
fn sh_blocks(md: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    let mut pending = String::new();
    for line in md.lines() {
        let t = line.trim();
        match &mut current {
            None if t == "```sh" => current = Some(Vec::new()),
            None => {}
            Some(_) if t == "```" => {
                blocks.push(current.take().unwrap());
                pending.clear();
            }
            Some(block) => {
                if let Some(head) = line.trim_end().strip_suffix('\\') {
                    pending.push_str(head);
                    pending.push(' ');
                    continue;
                }
                pending.push_str(line);
                let logical = std::mem::take(&mut pending).trim().to_owned();
                if !logical.is_empty() && !logical.starts_with('#') {
                    block.push(logical);
                }
            }
        }
    }
    assert!(current.is_none(), "an sh block is not closed");
    blocks
}

/// The simple commands of a shell line, as words: split at unquoted `|`, `&&`, `||`, `;`;
/// redirections (and their file) and comments left out; quotes removed.
fn commands(line: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut skip_next_word = false;
    let mut chars = line.chars().peekable();
    let finish =
        |word: &mut String, in_word: &mut bool, words: &mut Vec<String>, skip: &mut bool| {
            if *in_word {
                if *skip {
                    *skip = false;
                } else {
                    words.push(std::mem::take(word));
                }
                word.clear();
                *in_word = false;
            }
        };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                word.push(n);
                            }
                        }
                        c => word.push(c),
                    }
                }
            }
            '#' if !in_word => break,
            ' ' | '\t' => finish(&mut word, &mut in_word, &mut words, &mut skip_next_word),
            '|' | ';' | '&' => {
                finish(&mut word, &mut in_word, &mut words, &mut skip_next_word);
                if matches!(chars.peek(), Some('|') | Some('&')) {
                    chars.next();
                }
                if !words.is_empty() {
                    out.push(std::mem::take(&mut words));
                }
            }
            '>' | '<' => {
                finish(&mut word, &mut in_word, &mut words, &mut skip_next_word);
                if chars.peek() == Some(&'>') {
                    chars.next();
                }
                skip_next_word = true;
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    finish(&mut word, &mut in_word, &mut words, &mut skip_next_word);
    if !words.is_empty() {
        out.push(words);
    }
    out
}

/// What `haven <path> --help` says: subcommands, and flags with whether they take a value.
struct Help {
    subcommands: BTreeSet<String>,
    flags: HashMap<String, bool>,
}

fn help_of<'a>(path: &[String], cache: &'a mut HashMap<Vec<String>, Help>) -> &'a Help {
    cache.entry(path.to_vec()).or_insert_with(|| {
        let out = Command::new(env!("CARGO_BIN_EXE_haven"))
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "`haven {} --help` failed: {}",
            path.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut subcommands = BTreeSet::new();
        let mut flags = HashMap::new();
        let mut in_commands = false;
        for line in text.lines() {
            if line.trim_end() == "Commands:" {
                in_commands = true;
                continue;
            }
            if in_commands {
                if line.trim().is_empty() || !line.starts_with(' ') {
                    in_commands = false;
                } else if line.starts_with("  ") && !line.starts_with("   ") {
                    let name = line.split_whitespace().next().unwrap().to_owned();
                    subcommands.insert(name);
                }
                continue;
            }
            let t = line.trim_start();
            if t.starts_with('-') {
                let spec = t.split("  ").next().unwrap();
                let takes_value = spec.contains('<');
                for part in spec.split([',', ' ']) {
                    if part.starts_with('-') {
                        flags.insert(part.to_owned(), takes_value);
                    }
                }
            }
        }
        Help { subcommands, flags }
    })
}

/// Checks one `haven ...` command against the CLI; returns its subcommand path.
fn check_command(words: &[String], cache: &mut HashMap<Vec<String>, Help>) -> Vec<String> {
    let shown = words.join(" ");
    let mut path: Vec<String> = Vec::new();
    let mut positional = false;
    let mut i = 1;
    while i < words.len() {
        let w = &words[i];
        i += 1;
        if w == "--" {
            break;
        }
        if w.starts_with('-') && w.len() > 1 {
            let name = w.split('=').next().unwrap().to_owned();
            let help = help_of(&path, cache);
            let Some(&takes_value) = help.flags.get(&name) else {
                panic!(
                    "`{shown}`: `haven {} --help` has no flag {name}",
                    path.join(" ")
                );
            };
            if takes_value && !w.contains('=') {
                i += 1;
            }
            continue;
        }
        let help = help_of(&path, cache);
        if !positional && help.subcommands.contains(w.as_str()) {
            path.push(w.clone());
        } else {
            assert!(
                help.subcommands.is_empty(),
                "`{shown}`: `haven {}` has no subcommand {w} (it has {:?})",
                path.join(" "),
                help.subcommands
            );
            positional = true;
        }
    }
    // A command that needs a subcommand names one.
    assert!(
        help_of(&path, cache).subcommands.is_empty(),
        "`{shown}`: `haven {}` needs a subcommand",
        path.join(" ")
    );
    path
}

/// Every `haven` command of the `sh` blocks of `md`.
fn haven_commands(md: &str) -> Vec<Vec<String>> {
    sh_blocks(md)
        .iter()
        .flatten()
        .flat_map(|l| commands(l))
        .filter(|c| c[0] == "haven")
        .collect()
}

/// GitHub's anchor of a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(md: &str) -> BTreeSet<String> {
    md.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

/// The relative links `[..](target)` of `md`.
fn links(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = md;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            let target = &rest[..end];
            if !target.contains("://") && !target.contains(' ') {
                out.push(target.to_owned());
            }
        }
    }
    out
}

#[test]
fn shell_line_parsing() {
    assert_eq!(
        commands(r#"haven a --x "y z" > "f-$(date -u +%Y)" && curl -s 'q' | grep x # c"#),
        vec![
            vec!["haven", "a", "--x", "y z"],
            vec!["curl", "-s", "q"],
            vec!["grep", "x"]
        ]
    );
    let blocks = sh_blocks("t\n```sh\n# c\nhaven a \\\n  --b c   # d\n\n```\n```text\nx\n```\n");
    assert_eq!(blocks, vec![vec!["haven a    --b c   # d".to_owned()]]);
}

/// Every runbook the design asks for is there, every `haven` command of the runbooks and of
/// the README parses with this CLI, and every link between them (and every alert rule's
/// `runbook_url` anchor) resolves.
#[test]
fn runbook_and_readme_commands_parse_with_this_cli_and_links_resolve() {
    let files = runbook_files();
    let names: BTreeSet<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "README.md",
        "failover.md",
        "failback.md",
        "restore-from-backup.md",
        "node-loss.md",
        "incident-response.md",
        "post-mortem-template.md",
    ] {
        assert!(
            names.contains(expected),
            "docs/runbooks/{expected} is missing"
        );
    }
    let mut cache = HashMap::new();
    let mut used = BTreeSet::new();
    for f in &files {
        let md = std::fs::read_to_string(f).unwrap();
        let cmds = haven_commands(&md);
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if !matches!(name.as_str(), "README.md" | "post-mortem-template.md") {
            assert!(!cmds.is_empty(), "{name} has no haven command");
        }
        for c in &cmds {
            used.insert(check_command(c, &mut cache).join(" "));
        }
        for l in links(&md) {
            let file = l.split('#').next().unwrap();
            if !file.is_empty() {
                assert!(
                    f.parent().unwrap().join(file).exists(),
                    "{name} links to {l}, which does not exist"
                );
            }
        }
    }
    for path in [
        "region status",
        "region promote",
        "region demote",
        "region takeover",
        "region bootstrap",
        "backup restore",
        "serve",
    ] {
        assert!(used.contains(path), "no runbook uses `haven {path}`");
    }

    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for c in haven_commands(&readme) {
        check_command(&c, &mut cache);
    }
    for l in links(&readme) {
        let file = l.split('#').next().unwrap();
        if !file.is_empty() {
            assert!(repo().join(file).exists(), "README.md links to {l}");
        }
    }
    // The alert rules link the README's runbook headings.
    let heads = anchors(&readme);
    for f in [
        "deploy/prometheus/haven-alerts.yml",
        "deploy/prometheus/haven-alerts.test.yml",
    ] {
        let rules = std::fs::read_to_string(repo().join(f)).unwrap();
        let mut n = 0;
        for (i, _) in rules.match_indices("README.md#") {
            let anchor: String = rules[i + "README.md#".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            assert!(
                heads.contains(&anchor),
                "{f}: README.md#{anchor} is not a heading"
            );
            n += 1;
        }
        assert!(n > 0, "{f} links no runbook");
    }
    // The README's own in-page links too.
    for l in links(&readme) {
        if let Some(a) = l.strip_prefix('#') {
            assert!(
                heads.contains(a),
                "README.md links to #{a}, which is not a heading"
            );
        }
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Runs `haven ARGS...`; asserts success; its standard output.
fn haven_ok(args: &[&str], stdin: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "haven {}: {text}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

async fn put_note(url: &str, id: i64, name: &str, text: &str) {
    let r = stateless(
        &reqwest::Client::new(),
        url,
        id,
        "tools/call",
        json!({"name": "notes_put", "arguments": {"name": name, "text": text}}),
        json!({}),
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert!(
        v["result"].is_object() && v["result"]["isError"] != true,
        "{v}"
    );
}

/// A `haven serve` the runbook started, stopped (SIGTERM, then waited for) when replaced or
/// dropped.
struct Served(Child);

impl Served {
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Performs docs/runbooks/restore-from-backup.md as written: every line of its `sh` blocks in
/// order, in `sh`, with the variables set for a local node; a `haven serve` line (re)starts
/// the served node in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_runbook_performed_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup");
    let key = dir.path().join("backup.key");
    let data = dir.path().join("data");
    let restored = dir.path().join("restored");
    let (url, k, d) = (
        backup.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
        data.to_str().unwrap().to_owned(),
    );
    haven_ok(&["backup", "keygen", "--out", &k], b"");

    // Production, before the disaster: a secret, an upstream, a note; then the point
    // to restore; then a note that must not come back.
    let h = Haven::start(
        &data,
        free_port(),
        "default",
        &[
            "--backup-url",
            &url,
            "--backup-key-file",
            &k,
            "--backup-interval",
            "1h",
        ],
    )
    .await;
    haven_ok(&["secrets", "set", "api/token", "--data", &d], b"s3cret");
    let dead = format!("http://127.0.0.1:{}/mcp", free_port());
    haven_ok(
        &["registry", "add", "web", "--url", &dead, "--data", &d],
        b"",
    );
    put_note(&h.url(), 1, "before", "kept").await;
    haven_ok(&["backup", "now", "--data", &d], b"");
    let point = now_millis();
    let time = haven_backup::fmt_millis(point);
    // The next write is committed in a later millisecond than the point: wait for the clock
    // to pass it, not for a fixed time.
    while now_millis() <= point {
        tokio::task::yield_now().await;
    }
    put_note(&h.url(), 2, "after", "not restored").await;
    haven_ok(&["backup", "now", "--data", &d], b"");
    drop(h);

    let listen = format!("127.0.0.1:{}", free_port());
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_haven")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env: Vec<(&str, String)> = vec![
        ("PATH", path),
        ("BACKUP_URL", url.clone()),
        ("BACKUP_KEY", k.clone()),
        ("RESTORED", restored.to_str().unwrap().to_owned()),
        ("TIME", time.clone()),
        (
            "SECRETS_KEYS",
            data.join("secrets.keys").to_str().unwrap().to_owned(),
        ),
        ("LISTEN", listen.clone()),
    ];
    let md = std::fs::read_to_string(repo().join("docs/runbooks/restore-from-backup.md")).unwrap();
    let blocks = sh_blocks(&md);
    let mut served: Option<Served> = None;
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut serves = 0;
    for line in blocks.iter().flatten() {
        if line.starts_with("haven serve ") {
            if let Some(mut s) = served.take() {
                s.stop();
            }
            let log =
                std::fs::File::create(dir.path().join(format!("serve-{serves}.log"))).unwrap();
            serves += 1;
            let child = Command::new("sh")
                .arg("-c")
                .arg(format!("exec {line}"))
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .env("HAVEN_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            served = Some(Served(child));
            let ready = haven_testkit::wait_until(
                Duration::from_secs(90),
                Duration::from_millis(50),
                || async {
                    reqwest::get(format!("http://{listen}/readyz"))
                        .await
                        .is_ok_and(|r| r.status().is_success())
                },
            )
            .await;
            assert!(
                ready,
                "`{line}` did not become ready: {}",
                std::fs::read_to_string(dir.path().join(format!("serve-{}.log", serves - 1)))
                    .unwrap_or_default()
            );
            continue;
        }
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("set -e; {line}"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "runbook step `{line}` failed:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if line.starts_with("haven backup restore") {
            // The restored state is the one of $TIME.
            let s = RedbStore::open(
                &restored,
                Origin::new("t", "t"),
                Arc::new(HybridClock::default()),
            )
            .unwrap();
            let notes: Vec<String> = s
                .scan_all("notes", "")
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.record.key)
                .collect();
            assert_eq!(notes, vec!["before".to_owned()], "the state as of {time}");
        }
        outputs.push((line.clone(), stdout));
    }
    assert_eq!(
        serves, 2,
        "the runbook serves the restored node held, then for real"
    );
    let output = |prefix: &str| -> Vec<&str> {
        outputs
            .iter()
            .filter(|(l, _)| l.starts_with(prefix))
            .map(|(_, o)| o.as_str())
            .collect()
    };
    let restore = output("haven backup restore").concat();
    for expected in [
        "secrets key:",
        "admin token:",
        "upstreams: 1 registered upstream(s) (web)",
        "node id:",
    ] {
        assert!(
            restore.contains(expected),
            "{expected:?} not in:\n{restore}"
        );
    }
    let registry = output("haven registry list");
    assert_eq!(registry.len(), 2, "{outputs:?}");
    assert!(
        registry[0].contains("held"),
        "held while checked: {}",
        registry[0]
    );
    assert!(
        !registry[1].contains("held"),
        "started in service: {}",
        registry[1]
    );
    assert!(output("haven secrets list").concat().contains("api/token"));
    let list = output("haven backup list").pop().unwrap();
    assert_eq!(
        list.matches("\nGeneration ").count(),
        2,
        "in service, the restored node ships a new generation: {list}"
    );
    drop(served);
}

/// The check refuses what the CLI would: an unknown flag, an unknown subcommand, a missing
/// subcommand; and follows a flag's value and the words after `--`.
#[test]
fn the_command_check_catches_what_the_cli_refuses() {
    let mut cache = HashMap::new();
    let words = |l: &str| commands(l).remove(0);
    assert_eq!(
        check_command(
            &words(r#"haven backup restore --to "$D" --at restore --backup-url x"#),
            &mut cache
        ),
        ["backup", "restore"]
    );
    assert_eq!(
        check_command(
            &words("haven registry add e -- npx --not-a-haven-flag"),
            &mut cache
        ),
        ["registry", "add"]
    );
    for bad in [
        "haven backup restore --to d --nope",
        "haven region explode",
        "haven region",
        "haven serve --hold-upstream",
    ] {
        let w = words(bad);
        let mut c = HashMap::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_command(&w, &mut c);
        }));
        assert!(r.is_err(), "`{bad}` passed the check");
    }
}
