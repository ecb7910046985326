//! A small OAuth authorization server for tests, on 127.0.0.1: it publishes RFC 8414
//! metadata and a JWKS of ES256 keys, signs access tokens with whatever claims a test asks
//! for, rotates keys, and counts how often its JWKS is fetched. It is a real HTTP server, so
//! Haven discovers and fetches keys exactly as it would from a production issuer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

struct Key {
    kid: String,
    pair: rcgen::KeyPair,
}

struct Shared {
    issuer: String,
    keys: std::sync::Mutex<Vec<Key>>,
    /// Keys published in the JWKS (a rotated-out key can be withdrawn).
    fetches: AtomicU64,
    next: AtomicU64,
}

/// The running authorization server; stopped when dropped.
pub struct TestIdp {
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestIdp {
    /// Starts a server with one signing key.
    pub async fn start() -> TestIdp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the test issuer");
        let addr = listener.local_addr().expect("the issuer's address");
        let shared = Arc::new(Shared {
            issuer: format!("http://{addr}"),
            keys: std::sync::Mutex::new(Vec::new()),
            fetches: AtomicU64::new(0),
            next: AtomicU64::new(1),
        });
        let mut idp = TestIdp {
            shared: shared.clone(),
            stop: None,
        };
        idp.rotate();
        let app = Router::new()
            .route("/.well-known/oauth-authorization-server", get(metadata))
            .route("/jwks", get(jwks))
            .with_state(shared);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        idp.stop = Some(tx);
        idp
    }

    /// The issuer identifier (`http://127.0.0.1:PORT`).
    pub fn issuer(&self) -> &str {
        &self.shared.issuer
    }

    /// Adds a new signing key, which signs from now on; returns its key id.
    pub fn rotate(&self) -> String {
        let n = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let kid = format!("key-{n}");
        let pair = rcgen::KeyPair::generate().expect("generating an ES256 key");
        self.shared.keys.lock().unwrap().insert(
            0,
            Key {
                kid: kid.clone(),
                pair,
            },
        );
        kid
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> u64 {
        self.shared.fetches.load(Ordering::Relaxed)
    }

    /// Claims of a token that Haven at `resource` should accept: this issuer, `sub`, the
    /// audience, `scope`, issued now, expiring in ten minutes.
    pub fn claims(&self, sub: &str, resource: &str, scope: &str) -> Value {
        let now = now();
        json!({
            "iss": self.issuer(),
            "sub": sub,
            "aud": resource,
            "scope": scope,
            "client_id": format!("client-of-{sub}"),
            "iat": now,
            "exp": now + 600,
        })
    }

    /// A token with `claims`, signed ES256 by the current key and naming its `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        let keys = self.shared.keys.lock().unwrap();
        let k = &keys[0];
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(k.kid.clone());
        let key = EncodingKey::from_ec_pem(k.pair.serialize_pem().as_bytes())
            .expect("the test key as PEM");
        jsonwebtoken::encode(&h, claims, &key).expect("signing a test token")
    }

    /// A token signed by a key this issuer never published, naming `kid`.
    pub fn sign_with_unknown_key(&self, claims: &Value, kid: &str) -> String {
        let pair = rcgen::KeyPair::generate().expect("generating an ES256 key");
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.to_owned());
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("PEM");
        jsonwebtoken::encode(&h, claims, &key).expect("signing a test token")
    }

    /// The attack of a token "signed" HS256 with the issuer's public key as the secret.
    pub fn sign_hs256_with_public_key(&self, claims: &Value) -> String {
        let keys = self.shared.keys.lock().unwrap();
        let k = &keys[0];
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(k.kid.clone());
        let key = EncodingKey::from_secret(k.pair.public_key_pem().as_bytes()).expect("a secret");
        jsonwebtoken::encode(&h, claims, &key).expect("signing a test token")
    }

    /// The attack of an unsigned token (`alg: none`).
    pub fn unsigned(&self, claims: &Value) -> String {
        let kid = self.shared.keys.lock().unwrap()[0].kid.clone();
        let header = json!({"alg": "none", "typ": "JWT", "kid": kid});
        format!(
            "{}.{}.",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        )
    }
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn metadata(State(s): State<Arc<Shared>>) -> ([(&'static str, &'static str); 1], String) {
    json_answer(json!({
        "issuer": s.issuer,
        "jwks_uri": format!("{}/jwks", s.issuer),
        "token_endpoint": format!("{}/token", s.issuer),
        "grant_types_supported": ["client_credentials"],
    }))
}

async fn jwks(State(s): State<Arc<Shared>>) -> ([(&'static str, &'static str); 1], String) {
    s.fetches.fetch_add(1, Ordering::Relaxed);
    let keys = s.keys.lock().unwrap();
    let list: Vec<Value> = keys
        .iter()
        .map(|k| {
            // An uncompressed P-256 point: 0x04 || x (32 bytes) || y (32 bytes).
            let raw = k.pair.public_key_raw();
            json!({
                "kty": "EC",
                "crv": "P-256",
                "kid": k.kid,
                "use": "sig",
                "alg": "ES256",
                "x": B64.encode(&raw[1..33]),
                "y": B64.encode(&raw[33..65]),
            })
        })
        .collect();
    json_answer(json!({ "keys": list }))
}

fn json_answer(v: Value) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", "application/json")], v.to_string())
}
