//! The secrets service on a real store: envelope encryption round trips, nothing but ciphertext
//! reaches the store (records, change log, files), tampering and missing keys fail clearly, key
//! rotation re-wraps every data key without losing concurrent writes, and key files parse with
//! errors that never show key material.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use haven_secrets::{
    KekRing, KekSource, SECRETS_NS, SecretMeta, Secrets, SecretsError, is_valid_kid,
};
use haven_state::{Batch, Change, Store};

/// A store in `dir` (for the trait object the services take).
fn open_store(dir: &std::path::Path) -> Arc<dyn Store> {
    haven_testkit::redb_store(dir)
}

/// Secrets on a new store, under a generated key-encryption key.
fn generated() -> (tempfile::TempDir, Secrets) {
    let dir = tempfile::tempdir().unwrap();
    let s = Secrets::open(open_store(dir.path()), KekSource::generated()).unwrap();
    (dir, s)
}

/// Secrets on a new store under a new key file (one key), in a new directory.
struct KeyFile {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    file: std::path::PathBuf,
    /// The key's id.
    kid: String,
    secrets: Secrets,
}

fn key_file() -> KeyFile {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("data"));
    let file = dir.path().join("keys");
    let kid = KekRing::create_file(&file).unwrap();
    let secrets = Secrets::open(store.clone(), KekSource::file(&file)).unwrap();
    KeyFile {
        dir,
        store,
        file,
        kid,
        secrets,
    }
}

/// The names of listed secrets, in order.
fn names_of(list: Vec<SecretMeta>) -> Vec<String> {
    list.into_iter().map(|m| m.name).collect()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The key material (base64) of every key line of `text`.
fn materials(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
        .collect()
}

/// The key line of `kid` in a key file.
fn line_of(path: &Path, kid: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&format!("{kid} ")))
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn values_round_trip_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let s = Secrets::open(store.clone(), KekSource::generated()).unwrap();

    let m1 = s.set("api/token", b"first value").await.unwrap();
    assert_eq!((m1.version, m1.size), (1, 11));
    assert_eq!(m1.kek, s.primary_kid());
    assert_eq!(
        &s.get("api/token").await.unwrap().unwrap()[..],
        b"first value"
    );

    let m2 = s.set("api/token", b"second").await.unwrap();
    assert_eq!(m2.version, 2);
    assert_eq!(m2.created_millis, m1.created_millis);
    assert!(m2.updated_millis >= m1.updated_millis);
    assert_eq!(&s.get("api/token").await.unwrap().unwrap()[..], b"second");
    assert_eq!(s.meta("api/token").await.unwrap().unwrap(), m2);

    // Binary values, the empty value and the size limit.
    let binary: Vec<u8> = (0..=255u8).collect();
    s.set("bin", &binary).await.unwrap();
    assert_eq!(&s.get("bin").await.unwrap().unwrap()[..], &binary[..]);
    s.set("empty", b"").await.unwrap();
    assert_eq!(s.get("empty").await.unwrap().unwrap().len(), 0);
    s.set("big", &vec![7u8; 64 * 1024]).await.unwrap();
    let e = s.set("big", &vec![7u8; 64 * 1024 + 1]).await.unwrap_err();
    assert!(matches!(e, SecretsError::Invalid(_)), "{e}");
    assert!(e.to_string().contains("64 KiB"), "{e}");
    assert_eq!(s.get("big").await.unwrap().unwrap().len(), 64 * 1024);

    // Names.
    for bad in ["", "a b", "a:b", "ü", &"a".repeat(129)] {
        let e = s.set(bad, b"x").await.unwrap_err();
        assert!(matches!(e, SecretsError::Invalid(_)), "{bad}: {e}");
    }
    s.set(&"a".repeat(128), b"x").await.unwrap();

    // Deletion leaves a tombstone.
    assert!(s.delete("bin").await.unwrap());
    assert!(!s.delete("bin").await.unwrap());
    assert!(s.get("bin").await.unwrap().is_none());
    let raw = store.get_raw(SECRETS_NS, "bin").await.unwrap().unwrap();
    assert!(raw.record.is_tombstone());
    let m = s.set("bin", b"again").await.unwrap();
    assert_eq!(m.version, 1, "a deleted secret starts over");
}

#[tokio::test]
async fn reserved_names_are_for_haven_only() {
    let (_dir, s) = generated();
    s.set("system/request-state/k1", b"internal").await.unwrap();
    s.set_user("user-secret", b"u").await.unwrap();

    let e = s.set_user("system/x", b"v").await.unwrap_err();
    assert!(matches!(e, SecretsError::Reserved(_)), "{e}");
    assert!(e.to_string().contains("reserved"), "{e}");
    let e = s.delete_user("system/request-state/k1").await.unwrap_err();
    assert!(matches!(e, SecretsError::Reserved(_)), "{e}");
    assert!(s.get("system/request-state/k1").await.unwrap().is_some());

    let all = names_of(s.list().await.unwrap());
    assert_eq!(all, ["system/request-state/k1", "user-secret"]);
    let user = names_of(s.list_user().await.unwrap());
    assert_eq!(user, ["user-secret"]);
    assert_eq!(s.names().await.unwrap().len(), 2);

    // A template cannot pull a reserved secret out.
    let e = s
        .expand("${secret:system/request-state/k1}")
        .await
        .unwrap_err();
    assert!(matches!(e, SecretsError::Reserved(_)), "{e}");
    assert!(!e.to_string().contains("internal"));
}

#[tokio::test]
async fn only_ciphertext_reaches_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let store = open_store(&data);
    let key_text = KekRing::generate_line(Some("only"));
    let s = Secrets::open(store.clone(), KekSource::text(key_text.clone())).unwrap();
    let plain = b"correct horse battery staple 0123456789";
    for i in 0..5 {
        s.set(&format!("s{i}"), plain).await.unwrap();
    }
    let forbidden: Vec<Vec<u8>> = vec![
        plain.to_vec(),
        b64(plain).into_bytes(),
        materials(&key_text)[0].clone().into_bytes(),
    ];

    // The records as scanned.
    let page = store.scan(SECRETS_NS, "", None, 100).await.unwrap();
    assert_eq!(page.records.len(), 5);
    for r in &page.records {
        for f in &forbidden {
            assert!(
                !contains(r.value(), f),
                "record {} holds plaintext",
                r.record.key
            );
        }
        let v: serde_json::Value = serde_json::from_slice(r.value()).unwrap();
        for field in [
            "kek",
            "wrapped_dek",
            "nonce",
            "ciphertext",
            "created_millis",
            "updated_millis",
            "version",
        ] {
            assert!(v.get(field).is_some(), "field {field} missing: {v}");
        }
        assert_eq!(v["kek"], "only");
    }
    // The change log.
    let log = store.read_log(1, 10_000).await.unwrap();
    let mut seen = 0;
    for e in &log {
        if let Change::Record(r) = &e.change
            && r.namespace == SECRETS_NS
        {
            seen += 1;
            let bytes = r.value.clone().unwrap_or_default();
            for f in &forbidden {
                assert!(!contains(&bytes, f), "log entry {} holds plaintext", e.seq);
            }
        }
    }
    assert_eq!(seen, 5);
    // The files of the data directory (database and write-ahead log).
    drop(s);
    drop(store);
    let mut files = vec![data.clone()];
    let mut checked = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            let bytes = std::fs::read(&p).unwrap();
            for f in &forbidden {
                assert!(!contains(&bytes, f), "{} holds plaintext", p.display());
            }
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[tokio::test]
async fn listing_and_debug_show_no_values_or_keys() {
    let dir = tempfile::tempdir().unwrap();
    let key_text = KekRing::generate_line(Some("dbg"));
    let source = KekSource::text(key_text.clone());
    let s = Secrets::open(open_store(dir.path()), source.clone()).unwrap();
    s.set("visible-name", b"hidden-value-42").await.unwrap();
    let list = s.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "visible-name");
    assert_eq!(list[0].size, 15);
    let shown = format!(
        "{} {list:?} {s:?} {source:?} {:?}",
        serde_json::to_string(&list).unwrap(),
        s.keys()
    );
    assert!(!shown.contains("hidden-value-42"), "{shown}");
    assert!(!shown.contains(&materials(&key_text)[0]), "{shown}");
    assert!(shown.contains("dbg"), "{shown}");
}

#[tokio::test]
async fn templates_expand_and_name_missing_secrets() {
    let (_dir, s) = generated();
    s.set("user", b"alice").await.unwrap();
    s.set("api/token", b"t0k3n").await.unwrap();
    s.set("binary", &[0xff, 0xfe]).await.unwrap();
    let out = s
        .expand("Basic ${secret:user}:${secret:api/token}!")
        .await
        .unwrap();
    assert_eq!(out.as_str(), "Basic alice:t0k3n!");
    assert_eq!(s.expand("no refs").await.unwrap().as_str(), "no refs");

    let e = s.expand("${secret:user} ${secret:nope}").await.unwrap_err();
    assert!(
        matches!(&e, SecretsError::MissingSecret(n) if n == "nope"),
        "{e}"
    );
    assert!(
        e.to_string().contains("'nope'") && !e.to_string().contains("alice"),
        "{e}"
    );
    let e = s.expand("${secret:user").await.unwrap_err();
    assert!(e.to_string().contains("unterminated"), "{e}");
    let e = s.expand("${secret:binary}").await.unwrap_err();
    assert!(e.to_string().contains("not UTF-8"), "{e}");
}

#[tokio::test]
async fn a_missing_or_wrong_key_encryption_key_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let a = KekRing::generate_line(Some("key-a"));
    let s = Secrets::open(store.clone(), KekSource::text(a.clone())).unwrap();
    s.set("db-password", b"s3cret").await.unwrap();

    // Another node with a different key only.
    let other = Secrets::open(
        store.clone(),
        KekSource::text(KekRing::generate_line(Some("key-b"))),
    )
    .unwrap();
    let e = other.get("db-password").await.unwrap_err();
    match &e {
        SecretsError::UnknownKek { name, kid } => {
            assert_eq!((name.as_str(), kid.as_str()), ("db-password", "key-a"));
        }
        e => panic!("{e}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("add the line for 'key-a' back to the key file"),
        "{msg}"
    );
    assert!(!msg.contains("s3cret"));
    // Listing still works without the key.
    assert_eq!(other.list().await.unwrap()[0].kek, "key-a");

    // The same id with a different key.
    let wrong = Secrets::open(
        store.clone(),
        KekSource::text(KekRing::generate_line(Some("key-a"))),
    )
    .unwrap();
    let e = wrong.get("db-password").await.unwrap_err();
    assert!(
        matches!(
            e,
            SecretsError::Tampered {
                what: "data key",
                ..
            }
        ),
        "{e}"
    );

    // Both keys: the old one unwraps, the new primary wraps.
    let both = Secrets::open(
        store.clone(),
        KekSource::text(format!("{a};{}", KekRing::generate_line(Some("key-c")))),
    )
    .unwrap();
    assert_eq!(both.primary_kid(), "key-c");
    assert_eq!(
        &both.get("db-password").await.unwrap().unwrap()[..],
        b"s3cret"
    );
    assert_eq!(both.set("new", b"n").await.unwrap().kek, "key-c");
}

#[tokio::test]
async fn tampered_records_fail_to_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let s = Secrets::open(store.clone(), KekSource::generated()).unwrap();
    s.set("prod/token", b"the real token").await.unwrap();
    let rec = store.get(SECRETS_NS, "prod/token").await.unwrap().unwrap();

    // Copied under another name.
    store
        .commit(Batch::new().put(SECRETS_NS, "dev/token", rec.value().to_vec()))
        .await
        .unwrap();
    let e = s.get("dev/token").await.unwrap_err();
    assert!(
        matches!(&e, SecretsError::Tampered { name, .. } if name == "dev/token"),
        "{e}"
    );
    assert!(
        e.to_string().contains("copied from another secret's name"),
        "{e}"
    );
    assert!(!e.to_string().contains("the real token"));

    // Bit flips in the value's ciphertext, in the wrapped data key and in the nonce.
    for (field, what) in [
        ("ciphertext", "value"),
        ("wrapped_dek", "data key"),
        ("nonce", "value"),
    ] {
        let name = format!("flip/{field}");
        s.set(&name, b"the real token").await.unwrap();
        let stored = store.get(SECRETS_NS, &name).await.unwrap().unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(stored.value()).unwrap();
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(v[field].as_str().unwrap())
            .unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        v[field] = b64(&bytes).into();
        store
            .commit(Batch::new().put(SECRETS_NS, &name, serde_json::to_vec(&v).unwrap()))
            .await
            .unwrap();
        let e = s.get(&name).await.unwrap_err();
        assert!(
            matches!(&e, SecretsError::Tampered { what: w, .. } if *w == what),
            "{field}: {e}"
        );
    }
    assert_eq!(
        &s.get("prod/token").await.unwrap().unwrap()[..],
        b"the real token"
    );

    // Garbage is reported as unreadable, and a set replaces it.
    store
        .commit(Batch::new().put(SECRETS_NS, "junk", b"not json".to_vec()))
        .await
        .unwrap();
    let e = s.get("junk").await.unwrap_err();
    assert!(matches!(e, SecretsError::Corrupt { .. }), "{e}");
    s.set("junk", b"fixed").await.unwrap();
    assert_eq!(&s.get("junk").await.unwrap().unwrap()[..], b"fixed");
}

#[tokio::test]
async fn rotation_rewraps_every_data_key_under_the_new_primary() {
    let KeyFile {
        dir: _dir,
        store,
        file,
        kid: kid_a,
        secrets: s,
    } = key_file();
    for i in 0..20 {
        s.set(&format!("s{i:02}"), format!("value {i}").as_bytes())
            .await
            .unwrap();
    }
    let before: BTreeMap<String, String> = s
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.name, m.kek))
        .collect();
    assert!(before.values().all(|k| *k == kid_a));
    let ciphertexts = |recs: &haven_state::ScanPage| -> Vec<(String, String)> {
        recs.records
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_slice(r.value()).unwrap();
                (
                    v["nonce"].as_str().unwrap().to_owned(),
                    v["ciphertext"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let old = ciphertexts(&store.scan(SECRETS_NS, "", None, 100).await.unwrap());

    let kid_b = KekRing::append_new_key(&file).unwrap();
    assert_ne!(kid_a, kid_b);
    assert_eq!(
        s.kek_usage().await.unwrap(),
        BTreeMap::from([(kid_a.clone(), 20)])
    );
    let report = s.rotate_kek().await.unwrap();
    assert_eq!(report.primary, kid_b);
    assert_eq!(report.rewrapped, BTreeMap::from([(kid_a.clone(), 20)]));
    assert_eq!(report.unchanged, 0);
    assert!(report.failed.is_empty());
    assert_eq!(report.still_in_use.iter().collect::<Vec<_>>(), [&kid_b]);
    assert_eq!(
        s.kek_usage().await.unwrap(),
        BTreeMap::from([(kid_b.clone(), 20)])
    );
    // Values were not re-encrypted, only their data keys re-wrapped.
    let new = ciphertexts(&store.scan(SECRETS_NS, "", None, 100).await.unwrap());
    assert_eq!(old, new);
    // Versions and times are unchanged.
    for m in s.list().await.unwrap() {
        assert_eq!((m.version, m.kek.as_str()), (1, kid_b.as_str()));
    }

    // A ring holding only B reads everything.
    let only_b = Secrets::open(store.clone(), KekSource::text(line_of(&file, &kid_b))).unwrap();
    for i in 0..20 {
        assert_eq!(
            &only_b.get(&format!("s{i:02}")).await.unwrap().unwrap()[..],
            format!("value {i}").as_bytes()
        );
    }
    // Rotating again changes nothing.
    let again = s.rotate_kek().await.unwrap();
    assert!(again.rewrapped.is_empty());
    assert_eq!(again.unchanged, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_never_loses_a_concurrent_set() {
    let KeyFile {
        dir: _dir,
        store,
        file,
        kid: _,
        secrets: s,
    } = key_file();
    const NAMES: usize = 6;
    for i in 0..NAMES {
        s.set(&format!("n{i}"), b"initial").await.unwrap();
    }
    let kid_b = KekRing::append_new_key(&file).unwrap();

    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut last = BTreeMap::new();
            for iter in 0..200 {
                let name = format!("n{}", iter % NAMES);
                let value = format!("value {iter}");
                s.set(&name, value.as_bytes()).await.unwrap();
                last.insert(name, value);
            }
            last
        })
    };
    let mut rotations = 0;
    let mut rewrapped = 0;
    while !writer.is_finished() || rotations == 0 {
        let r = s.rotate_kek().await.unwrap();
        assert!(r.failed.is_empty(), "{r:?}");
        rewrapped += r.rewrapped.values().sum::<usize>();
        rotations += 1;
    }
    let last = writer.await.unwrap();
    assert!(rotations >= 1 && rewrapped <= NAMES);

    let only_b = Secrets::open(store.clone(), KekSource::text(line_of(&file, &kid_b))).unwrap();
    for (name, value) in &last {
        assert_eq!(
            &only_b.get(name).await.unwrap().unwrap()[..],
            value.as_bytes(),
            "{name}"
        );
    }
    assert_eq!(
        s.kek_usage().await.unwrap(),
        BTreeMap::from([(kid_b, NAMES)])
    );
    // Every set counted: version = 1 (initial) + the writer's sets of that name.
    for m in s.list().await.unwrap() {
        assert_eq!(
            m.version,
            1 + 200 / NAMES as u64 + u64::from(m.name[1..].parse::<usize>().unwrap() < 200 % NAMES)
        );
    }
}

#[test]
fn key_files_parse_with_clear_errors() {
    let a = KekRing::generate_line(Some("a"));
    let b = KekRing::generate_line(Some("b_2-X"));
    let ring = KekRing::parse(&format!("# keys\n\n{a}\n   # old\n{b}\n"), "key file k").unwrap();
    assert_eq!(ring.kids(), ["a", "b_2-X"]);
    assert_eq!(ring.primary_kid(), "b_2-X");
    assert!(ring.contains("a"));
    let env = KekRing::parse_env(&format!("{b}; {a};")).unwrap();
    assert_eq!(env.primary_kid(), "a");

    let mat_a = materials(&a)[0].clone();
    let check = |text: String, want: &[&str]| {
        let e = KekRing::parse(&text, "key file /etc/k").unwrap_err();
        let msg = e.to_string();
        for w in want {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}");
        }
        assert!(!msg.contains(&mat_a), "key material in {msg:?}");
        e
    };
    // Malformed: one field (the key alone), three fields, reversed fields.
    let e = check(
        format!("{a}\n\n{mat_a}\n"),
        &["key file /etc/k, line 3", "<kid> <base64"],
    );
    assert!(matches!(e, SecretsError::KeyLine { line: 3, .. }));
    check(format!("{a} extra\n"), &["line 1", "two fields"]);
    check(format!("{mat_a} a\n"), &["line 1", "key id"]);
    check(
        format!("{}\n", "x".repeat(33) + " " + &mat_a),
        &["line 1", "1 to 32"],
    );
    // Duplicate id.
    let e = check(
        format!("{a}\n{}\n", KekRing::generate_line(Some("a"))),
        &["'a' is listed twice", "line 1", "line 2"],
    );
    assert!(matches!(e, SecretsError::DuplicateKid { .. }));
    // Wrong length and bad base64.
    check(
        format!("short {}\n", b64(&[1u8; 16])),
        &["line 1", "'short' is 16 bytes", "32 bytes"],
    );
    check("bad !!!notbase64\n".into(), &["line 1", "not valid base64"]);
    // Nothing but comments.
    let e = KekRing::parse("# nothing\n\n", "key file e").unwrap_err();
    assert!(matches!(e, SecretsError::NoKeys(_)), "{e}");
    // Env entries are numbered by `;`.
    let e = KekRing::parse_env(&format!("{a};oops")).unwrap_err();
    assert!(e.to_string().contains("HAVEN_SECRETS_KEYS, line 2"), "{e}");

    // Generated lines.
    let line = KekRing::generate_line(None);
    let kid = line.split_whitespace().next().unwrap();
    assert!(kid.starts_with('k') && is_valid_kid(kid), "{kid}");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(line.split_whitespace().nth(1).unwrap())
            .unwrap()
            .len(),
        32
    );
}

#[test]
fn key_files_are_created_private_and_appended() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.keys");
    let k1 = KekRing::create_file(&file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let e = KekRing::create_file(&file).unwrap_err();
    assert!(matches!(e, SecretsError::KeyFileExists(_)), "{e}");
    assert_eq!(
        KekRing::from_file(&file).unwrap().kids(),
        std::slice::from_ref(&k1)
    );

    // Appended keys get distinct ids (even within the same second) and become the primary.
    let k2 = KekRing::append_new_key(&file).unwrap();
    let k3 = KekRing::append_new_key(&file).unwrap();
    let ring = KekRing::from_file(&file).unwrap();
    assert_eq!(ring.kids(), [k1, k2, k3.clone()]);
    assert_eq!(ring.primary_kid(), k3);

    // A file without a trailing newline gets one before the new line.
    let f2 = dir.path().join("other.keys");
    std::fs::write(&f2, KekRing::generate_line(Some("x"))).unwrap();
    #[cfg(unix)]
    {
        // A key file others may read is refused, for reading and for adding a key, and left
        // as it was.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f2, std::fs::Permissions::from_mode(0o644)).unwrap();
        let before = std::fs::read(&f2).unwrap();
        for e in [
            KekRing::from_file(&f2).unwrap_err(),
            KekRing::append_new_key(&f2).unwrap_err(),
        ] {
            let text = e.to_string();
            assert!(
                text.contains("secrets key file")
                    && text.contains("0644")
                    && text.contains(&format!("chmod 600 {}", f2.display())),
                "{text}"
            );
        }
        assert_eq!(std::fs::read(&f2).unwrap(), before);
        std::fs::set_permissions(&f2, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let k = KekRing::append_new_key(&f2).unwrap();
    assert_eq!(
        KekRing::from_file(&f2).unwrap().kids(),
        ["x".to_string(), k]
    );

    // A missing file is an error naming it.
    let e = KekSource::file(dir.path().join("missing"))
        .load()
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");

    // File and text together: the text's last key is the primary; the same id with the same
    // key in both is fine, with another key it is an error.
    let same = line_of(&file, &KekRing::from_file(&file).unwrap().kids()[0]);
    let src = KekSource::file(&file);
    let both = KekSource {
        env: Some(format!(
            "{same};{}",
            KekRing::generate_line(Some("env-key"))
        )),
        ..src.clone()
    };
    let ring = both.load().unwrap();
    assert_eq!(ring.primary_kid(), "env-key");
    assert_eq!(ring.kids().len(), 4);
    let clash = KekSource {
        env: Some(KekRing::generate_line(Some(&ring.kids()[1]))),
        ..src
    };
    let e = clash.load().unwrap_err();
    assert!(matches!(e, SecretsError::DuplicateKid { .. }), "{e}");
    let e = KekSource::default().load().unwrap_err();
    assert!(matches!(e, SecretsError::NoKeys(_)), "{e}");

    // Keys from a command: its output is a key file's content; a failing or silent command,
    // or one with a bad line, is an error that shows no key material; a file and a command
    // together are refused.
    #[cfg(unix)]
    {
        let line = KekRing::generate_line(Some("from-cmd"));
        let cmd = format!("printf '# a comment\\n%s\\n' '{line}'");
        let ring = KekSource::command(&cmd).load().unwrap();
        assert_eq!(ring.kids(), ["from-cmd"]);
        let with_env = KekSource {
            env: Some(KekRing::generate_line(Some("env-key"))),
            ..KekSource::command(&cmd)
        };
        assert_eq!(with_env.load().unwrap().primary_kid(), "env-key");
        let secret_part = line.split_whitespace().nth(1).unwrap().to_owned();
        for bad in [
            format!("sh -c 'echo {secret_part} >&2; exit 1'"),
            "true".to_owned(),
            format!("echo from-cmd {secret_part}x"),
        ] {
            let e = KekSource::command(&bad).load().unwrap_err().to_string();
            assert!(!e.contains(&secret_part), "{bad}: {e}");
            assert!(e.contains("secrets key command"), "{bad}: {e}");
        }
        let both = KekSource {
            file: Some(file.clone()),
            ..KekSource::command(&cmd)
        };
        assert!(both.load().unwrap_err().to_string().contains("not both"));
    }
}

#[tokio::test]
async fn reloading_keys_picks_up_a_new_primary() {
    let KeyFile {
        dir: _dir,
        store: _,
        file,
        kid: k1,
        secrets: s,
    } = key_file();
    assert_eq!(s.primary_kid(), k1);
    let k2 = KekRing::append_new_key(&file).unwrap();
    assert_eq!(s.primary_kid(), k1, "keys are read on reload only");
    s.reload_keys().unwrap();
    assert_eq!(s.primary_kid(), k2);
    assert_eq!(s.known_kids(), [k1, k2.clone()]);
    // A broken file leaves the loaded keys in place.
    std::fs::write(&file, "garbage\n").unwrap();
    assert!(s.reload_keys().is_err());
    assert_eq!(s.primary_kid(), k2);
}

#[tokio::test]
async fn create_sets_only_an_absent_secret() {
    let (_dir, s) = generated();
    assert!(s.create("system/admin-token/r1", b"first").await.unwrap());
    // Existing: nothing changes, whoever asks.
    assert!(!s.create("system/admin-token/r1", b"second").await.unwrap());
    assert_eq!(
        &s.get("system/admin-token/r1").await.unwrap().unwrap()[..],
        b"first"
    );
    // Two at once: exactly one creates it, and the stored value is that one's.
    let (a, b) = tokio::join!(
        s.create("system/admin-token/r2", b"a"),
        s.create("system/admin-token/r2", b"b")
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a ^ b, "{a} {b}");
    let stored = s.get("system/admin-token/r2").await.unwrap().unwrap();
    assert_eq!(&stored[..], if a { &b"a"[..] } else { &b"b"[..] });
    // Bad input changes nothing.
    assert!(s.create("bad//name", b"x").await.is_err());
    assert!(s.create("system/big", &vec![0u8; 70 * 1024]).await.is_err());
    assert!(s.get("system/big").await.unwrap().is_none());
}
