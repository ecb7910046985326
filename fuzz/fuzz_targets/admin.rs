//! The control plane's admin inputs, as the admin API hands them over: registry entries
//! (`UpstreamSpec` JSON, validation, secret references `${secret:NAME}`, the naming rule),
//! settings (`config set` of every setting), secret names and values, and key files. The
//! promise: a bad change gets a clear error of the caller's making (a 4xx in the API) and
//! changes nothing in the store; a good one reads back as written.
//!
//! The input is a few commands, one a line (see `fuzz/corpus/admin/` for examples):
//! `add JSON`, `replace JSON`, `remove NAME`, `set KEY VALUE`, `unset KEY`,
//! `secret NAME VALUE`, `forget NAME`, `expand TEMPLATE`, `template VALUE`, `served NAME`,
//! and `keys`, after which the rest of the input is a key file.
#![no_main]

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use haven_control::config::{ConfigError, ConfigService, parse_value};
use haven_control::registry::{
    self, Piece, Registry, RegistryError, UpstreamSpec, parse_template, served_name, served_uri,
    split_name, split_uri,
};
use haven_fuzz::{assert_clear_message, redb_store, runtime};
use haven_secrets::{self as secrets, KekRing, KekSource, Secrets, SecretsError};
use haven_state::Store;
use libfuzzer_sys::fuzz_target;

struct Control {
    store: Arc<dyn Store>,
    registry: Registry,
    config: ConfigService,
    secrets: Secrets,
}

fn control() -> &'static Control {
    static CONTROL: OnceLock<Control> = OnceLock::new();
    CONTROL.get_or_init(|| {
        runtime().block_on(async {
            let store = redb_store("admin");
            let config = ConfigService::start(store.clone())
                .await
                .expect("config service");
            let secrets = Secrets::open(store.clone(), KekSource::generated()).expect("secrets");
            secrets
                .set_user("github/token", b"t0ken")
                .await
                .expect("a first secret");
            Control {
                registry: Registry::new(store.clone()),
                store,
                config,
                secrets,
            }
        })
    })
}

async fn last_seq(c: &Control) -> u64 {
    c.store.last_seq().await.expect("last_seq")
}

/// A refused change left the store as it was.
async fn unchanged(c: &Control, before: u64, what: &str) {
    assert_eq!(
        last_seq(c).await,
        before,
        "a refused {what} changed the store"
    );
}

async fn add(c: &Control, json: &str, replace: bool) {
    let spec: UpstreamSpec = match serde_json::from_str(json) {
        Ok(s) => s,
        Err(e) => return assert_clear_message("registry entry JSON", &e.to_string()),
    };
    let known: BTreeSet<String> = c.secrets.names().await.expect("secret names");
    let before = last_seq(c).await;
    match c.registry.add(&spec, &known, replace).await {
        Ok(()) => {
            spec.validate().expect("an added entry is valid");
            let back = c.registry.get(&spec.name).await.expect("get");
            assert_eq!(
                back.as_ref(),
                Some(&spec),
                "an added entry reads back as written"
            );
        }
        Err(
            e @ (RegistryError::Invalid(_)
            | RegistryError::Duplicate(_)
            | RegistryError::UnknownSecrets(_)),
        ) => {
            assert_clear_message("registry add", &e.to_string());
            unchanged(c, before, "registry entry").await;
        }
        Err(e) => panic!("registry add failed with a server-side error: {e}"),
    }
}

async fn remove(c: &Control, name: &str) {
    let before = last_seq(c).await;
    match c.registry.remove(name).await {
        Ok(()) => assert_eq!(c.registry.get(name).await.expect("get"), None),
        Err(e @ RegistryError::NotFound(_)) => {
            assert_clear_message("registry remove", &e.to_string());
            unchanged(c, before, "registry removal").await;
        }
        Err(e) => panic!("registry remove failed with a server-side error: {e}"),
    }
}

async fn set(c: &Control, key: &str, text: &str) {
    let before = last_seq(c).await;
    match c.config.set(key, text).await {
        Ok(entry) => {
            assert_eq!(
                entry.value,
                parse_value(key, text).expect("accepted value parses")
            );
            let stored = c.config.get(key).await.expect("get");
            assert_eq!(stored.value, entry.value, "a setting reads back as set");
        }
        Err(e @ (ConfigError::Unknown(..) | ConfigError::Invalid { .. })) => {
            assert_clear_message("config set", &e.to_string());
            unchanged(c, before, "setting").await;
        }
        Err(e) => panic!("config set failed with a server-side error: {e}"),
    }
}

async fn unset(c: &Control, key: &str) {
    let before = last_seq(c).await;
    match c.config.unset(key).await {
        Ok(entry) => assert_eq!(entry.value, entry.default),
        Err(e @ ConfigError::Unknown(..)) => {
            assert_clear_message("config unset", &e.to_string());
            unchanged(c, before, "unset").await;
        }
        Err(e) => panic!("config unset failed with a server-side error: {e}"),
    }
}

async fn secret(c: &Control, name: &str, value: &str) {
    let before = last_seq(c).await;
    match c.secrets.set_user(name, value.as_bytes()).await {
        Ok(meta) => {
            assert_eq!(meta.name, name);
            let back = c.secrets.get(name).await.expect("get").expect("present");
            assert_eq!(
                back.as_slice(),
                value.as_bytes(),
                "a secret reads back as set"
            );
            secrets::validate_name(name).expect("a stored name is valid");
        }
        Err(e @ (SecretsError::Invalid(_) | SecretsError::Reserved(_))) => {
            assert_clear_message("secret set", &e.to_string());
            unchanged(c, before, "secret").await;
        }
        Err(e) => panic!("secret set failed with a server-side error: {e}"),
    }
}

async fn forget(c: &Control, name: &str) {
    let before = last_seq(c).await;
    match c.secrets.delete_user(name).await {
        Ok(true) => assert!(c.secrets.get(name).await.expect("get").is_none()),
        Ok(false) => unchanged(c, before, "secret deletion").await,
        Err(
            e @ (SecretsError::Invalid(_) | SecretsError::Reserved(_) | SecretsError::NotFound(_)),
        ) => {
            assert_clear_message("secret delete", &e.to_string());
            unchanged(c, before, "secret deletion").await;
        }
        Err(e) => panic!("secret delete failed with a server-side error: {e}"),
    }
}

async fn expand(c: &Control, template: &str) {
    match c.secrets.expand(template).await {
        Ok(text) => {
            // Without references, the template is its own value.
            if !template.contains("${secret:") {
                assert_eq!(text.as_str(), template);
            }
        }
        Err(
            e @ (SecretsError::Invalid(_)
            | SecretsError::Reserved(_)
            | SecretsError::MissingSecret(_)),
        ) => assert_clear_message("expand", &e.to_string()),
        Err(e) => panic!("expanding a template failed with a server-side error: {e}"),
    }
}

/// A template splits into pieces that put together give it back.
fn template(value: &str) {
    match parse_template(value) {
        Ok(pieces) => {
            let mut again = String::new();
            for p in &pieces {
                match p {
                    Piece::Text(t) => again.push_str(t),
                    Piece::Secret(s) => {
                        assert!(!s.is_empty() && s.chars().all(registry::is_secret_name_char));
                        again.push_str(&format!("${{secret:{s}}}"));
                    }
                }
            }
            assert_eq!(again, value, "template pieces do not give the value back");
        }
        Err(e) => assert_clear_message("template", &e.to_string()),
    }
}

/// The naming rule: a served name or URI splits into what joins back to it.
fn served(text: &str) {
    if let Some((up, name)) = split_name(text) {
        registry::validate_name(up).expect("split_name gives a valid upstream name");
        assert_eq!(served_name(up, name), text);
    }
    if let Some((up, uri)) = split_uri(text) {
        registry::validate_name(up).expect("split_uri gives a valid upstream name");
        assert_eq!(served_uri(up, uri), text);
    }
    let _ = registry::validate_name(text);
    let _ = secrets::validate_name(text);
}

fn keys(text: &str) {
    for ring in [
        KekRing::parse(text, "fuzz key file"),
        KekRing::parse_env(text),
    ] {
        match ring {
            Ok(ring) => {
                let kids = ring.kids();
                assert!(kids.iter().any(|k| k == ring.primary_kid()));
                assert!(kids.iter().all(|k| secrets::is_valid_kid(k)));
            }
            Err(e) => assert_clear_message("key file", &e.to_string()),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let c = control();
    runtime().block_on(async {
        let mut lines = text.split('\n');
        for _ in 0..16 {
            let Some(line) = lines.next() else { break };
            let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
            let (first, second) = rest.split_once(' ').unwrap_or((rest, ""));
            match verb {
                "add" => add(c, rest, false).await,
                "replace" => add(c, rest, true).await,
                "remove" => remove(c, rest).await,
                "set" => set(c, first, second).await,
                "unset" => unset(c, rest).await,
                "secret" => secret(c, first, second).await,
                "forget" => forget(c, rest).await,
                "expand" => expand(c, rest).await,
                "template" => template(rest),
                "served" => served(rest),
                "keys" => {
                    let remaining: Vec<&str> = lines.by_ref().collect();
                    keys(&remaining.join("\n"));
                }
                _ => served(line),
            }
        }
    });
});
