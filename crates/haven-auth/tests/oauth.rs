//! Token validation against a real issuer on loopback (the testkit's `TestIdp`): what is
//! accepted, and the attack set, each refused with the reason named.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use haven_auth::oauth::Now;
use haven_auth::{AuthError, Authenticator, OAuthSettings, PrincipalKind, TokenValidator};
use haven_testkit::idp::TestIdp;
use serde_json::json;

const RESOURCE: &str = "https://haven.test/mcp";

fn clock() -> (Arc<AtomicU64>, Now) {
    let t = Arc::new(AtomicU64::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    ));
    let c = t.clone();
    (t, Arc::new(move || c.load(Ordering::Relaxed)))
}

fn validator(idp: &TestIdp, now: Now) -> Arc<TokenValidator> {
    let mut s = OAuthSettings::new(idp.issuer(), RESOURCE);
    s.jwks_min_refresh = Duration::from_secs(3600);
    Arc::new(TokenValidator::new(s, now).unwrap())
}

fn invalid(r: Result<haven_auth::Principal, haven_auth::TokenError>) -> String {
    match r {
        Err(haven_auth::TokenError::Invalid(m)) => m,
        other => panic!("expected an invalid token, got {other:?}"),
    }
}

#[tokio::test]
async fn a_valid_token_names_its_principal() {
    let idp = TestIdp::start().await;
    let (_, now) = clock();
    let v = validator(&idp, now);
    let mut claims = idp.claims("alice", RESOURCE, "mcp notes:write");
    claims["groups"] = json!(["team-a", "ops"]);
    claims["roles"] = json!("admin");
    let p = v.validate(&idp.sign(&claims)).await.unwrap();
    assert_eq!(p.kind, PrincipalKind::Token);
    assert_eq!(p.subject, "alice");
    assert_eq!(p.issuer.as_deref(), Some(idp.issuer()));
    assert_eq!(p.client_id.as_deref(), Some("client-of-alice"));
    assert_eq!(p.scopes, vec!["mcp", "notes:write"]);
    assert_eq!(p.groups, vec!["team-a", "ops", "admin"]);
    assert_eq!(p.id(), format!("token:{}#alice", idp.issuer()));
    // The audience may be a list that contains this resource.
    claims["aud"] = json!(["https://other.test/api", RESOURCE]);
    v.validate(&idp.sign(&claims)).await.unwrap();
    assert_eq!(idp.jwks_fetches(), 1, "the keys are fetched once and kept");
}

#[tokio::test]
async fn the_attack_set_is_refused() {
    let idp = TestIdp::start().await;
    let (t, now) = clock();
    let v = validator(&idp, now);
    let good = idp.claims("mallory", RESOURCE, "mcp");

    let m = invalid(v.validate(&idp.unsigned(&good)).await);
    assert!(m.contains("header") || m.contains("algorithm"), "{m}");
    let m = invalid(v.validate(&idp.sign_hs256_with_public_key(&good)).await);
    assert!(m.contains("algorithm"), "{m}");

    let mut c = good.clone();
    c["exp"] = json!(t.load(Ordering::Relaxed) - 120);
    assert!(invalid(v.validate(&idp.sign(&c)).await).contains("expired"));
    let mut c = good.clone();
    c["nbf"] = json!(t.load(Ordering::Relaxed) + 600);
    assert!(invalid(v.validate(&idp.sign(&c)).await).contains("not valid yet"));
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("exp");
    assert!(invalid(v.validate(&idp.sign(&c)).await).contains("exp"));
    let mut c = good.clone();
    c["iss"] = json!("https://evil.test");
    assert!(invalid(v.validate(&idp.sign(&c)).await).contains("issuer"));
    let mut c = good.clone();
    c["aud"] = json!("https://other-resource.test/mcp");
    assert!(invalid(v.validate(&idp.sign(&c)).await).contains("audience"));
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("aud");
    invalid(v.validate(&idp.sign(&c)).await);

    // An altered signature, and an altered payload under the original signature.
    let token = idp.sign(&good);
    let (rest, sig) = token.rsplit_once('.').unwrap();
    let mut sig: Vec<u8> = sig.bytes().collect();
    sig[5] = if sig[5] == b'A' { b'B' } else { b'A' };
    let altered = format!("{rest}.{}", String::from_utf8(sig).unwrap());
    assert!(invalid(v.validate(&altered).await).contains("signature"));
    let parts: Vec<&str> = token.split('.').collect();
    let mut admin = good.clone();
    admin["sub"] = json!("admin");
    use base64::Engine;
    let forged_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(admin.to_string());
    let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert!(invalid(v.validate(&forged).await).contains("signature"));

    // Garbage.
    invalid(v.validate("not-a-token").await);
    invalid(v.validate("a.b.c").await);

    // Time moves: the good token ages out (past the 30 s leeway), not before.
    let ok = idp.sign(&good);
    t.fetch_add(600 + 20, Ordering::Relaxed);
    v.validate(&ok).await.unwrap();
    t.fetch_add(20, Ordering::Relaxed);
    assert!(invalid(v.validate(&ok).await).contains("expired"));
}

#[tokio::test]
async fn unknown_key_ids_refresh_the_keys_at_most_once_per_interval() {
    let idp = TestIdp::start().await;
    let (t, now) = clock();
    let v = validator(&idp, now);
    let mut claims = idp.claims("bob", RESOURCE, "mcp");
    claims["exp"] = json!(t.load(Ordering::Relaxed) + 100_000);
    v.validate(&idp.sign(&claims)).await.unwrap();
    assert_eq!(idp.jwks_fetches(), 1);
    // Within the interval after a fetch, unknown key ids cause no fetch at all.
    for i in 0..10 {
        let tok = idp.sign_with_unknown_key(&claims, &format!("nope-{i}"));
        assert!(invalid(v.validate(&tok).await).contains("no key"));
    }
    assert_eq!(idp.jwks_fetches(), 1);
    // Once it has passed, a flood causes one fetch.
    t.fetch_add(3600, Ordering::Relaxed);
    for i in 0..20 {
        let tok = idp.sign_with_unknown_key(&claims, &format!("nope-{i}"));
        assert!(invalid(v.validate(&tok).await).contains("no key"));
    }
    assert_eq!(idp.jwks_fetches(), 2, "one refresh for the whole flood");
    // A key rotated in meanwhile is found by the next refresh.
    idp.rotate();
    let rotated = idp.sign(&claims);
    assert!(invalid(v.validate(&rotated).await).contains("no key"));
    t.fetch_add(3600, Ordering::Relaxed);
    v.validate(&rotated).await.unwrap();
    assert_eq!(idp.jwks_fetches(), 3);

    // With a short interval, a rotated key is picked up by the refresh its first token causes.
    let mut s = OAuthSettings::new(idp.issuer(), RESOURCE);
    s.jwks_min_refresh = Duration::ZERO;
    let v = TokenValidator::new(s, clock().1).unwrap();
    v.validate(&idp.sign(&claims)).await.unwrap();
    let before = idp.jwks_fetches();
    let kid = idp.rotate();
    let token = idp.sign(&claims);
    assert!(token.len() > 10 && !kid.is_empty());
    v.validate(&token).await.unwrap();
    assert_eq!(idp.jwks_fetches(), before + 1);
}

#[tokio::test]
async fn scopes_and_an_unreachable_issuer() {
    let idp = TestIdp::start().await;
    let (_, now) = clock();
    let v = validator(&idp, now.clone());
    let auth = Authenticator::new(Some(v), None, vec!["mcp".into()], vec![]);
    let with = idp.sign(&idp.claims("carol", RESOURCE, "mcp other"));
    let without = idp.sign(&idp.claims("carol", RESOURCE, "other"));
    let p = auth
        .authenticate(Some(&format!("bearer {with}")))
        .await
        .unwrap();
    assert_eq!(p.subject, "carol");
    assert_eq!(
        auth.authenticate(Some(&format!("Bearer {without}"))).await,
        Err(AuthError::InsufficientScope {
            required: vec!["mcp".into()]
        })
    );
    assert_eq!(auth.authenticate(None).await, Err(AuthError::Missing));
    assert!(matches!(
        auth.authenticate(Some(&format!("Basic {with}"))).await,
        Err(AuthError::Invalid(_))
    ));
    let meta = auth.resource_metadata(RESOURCE);
    assert_eq!(meta["resource"], RESOURCE);
    assert_eq!(meta["authorization_servers"], json!([idp.issuer()]));
    assert_eq!(meta["scopes_supported"], json!(["mcp"]));

    // An issuer that cannot be reached, with no key cached: unavailable, not "invalid".
    let issuer = idp.issuer().to_owned();
    drop(idp);
    let v = Arc::new(TokenValidator::new(OAuthSettings::new(&issuer, RESOURCE), now).unwrap());
    let auth = Authenticator::new(Some(v), None, vec![], vec![]);
    assert!(matches!(
        auth.authenticate(Some(&format!("Bearer {with}"))).await,
        Err(AuthError::Unavailable(_))
    ));
}

#[tokio::test]
async fn a_token_verified_once_is_still_judged_by_its_times_at_every_use() {
    let idp = TestIdp::start().await;
    let (t, now) = clock();
    let v = validator(&idp, now);
    let mut claims = idp.claims("carol", RESOURCE, "mcp");
    claims["exp"] = json!(t.load(Ordering::Relaxed) + 60);
    let token = idp.sign(&claims);
    // Verified, then served from the cache of verified tokens.
    assert_eq!(v.validate(&token).await.unwrap().subject, "carol");
    assert_eq!(v.validate(&token).await.unwrap().subject, "carol");
    // A copy with one signature character changed is another token: verified, refused.
    let (head, sig) = token.rsplit_once('.').unwrap();
    let flipped = format!(
        "{head}.{}{}",
        if sig.starts_with('A') { 'B' } else { 'A' },
        &sig[1..]
    );
    assert!(v.validate(&flipped).await.is_err());
    // Past its expiry (and the leeway), the cached token is refused.
    t.fetch_add(60 + 31, Ordering::Relaxed);
    assert!(invalid(v.validate(&token).await).contains("expired"));
    // A token not yet valid when first seen stays refused until its nbf.
    let mut early = idp.claims("dave", RESOURCE, "mcp");
    let at = t.load(Ordering::Relaxed);
    early["nbf"] = json!(at + 600);
    early["exp"] = json!(at + 3000);
    let early = idp.sign(&early);
    assert!(invalid(v.validate(&early).await).contains("nbf"));
    t.fetch_add(600, Ordering::Relaxed);
    assert_eq!(v.validate(&early).await.unwrap().subject, "dave");
}
