//! Identity: JWTs that cannot be forged (HS256 with a secret, RS256 / ES256 with a public
//! key file), room permissions from their claims, `auth.required`, who may publish, trusted
//! publishers, and a token that expires while its socket is open.

mod common;

use std::path::PathBuf;

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use volley::config::ClientPublish;
use volley::Config;

const SECRET: &str = "test-secret-with-enough-bytes-for-hs256";

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn user(sub: &str) -> Value {
    json!({"sub": sub, "exp": now_s() + 3600})
}

fn with_secret(c: &mut Config) {
    c.auth.jwt_secret = SECRET.into();
    c.limits.publish_rate = 0;
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

async fn auth(client: &mut Client, token: &str) -> Value {
    client.send(json!({"type":"auth","token":token})).await;
    client.next_message().await
}

#[tokio::test]
async fn a_valid_token_gives_its_subject_and_bad_ones_give_nothing() {
    let server = start(with_secret).await;
    let mut c = Client::connect(server.local_addr()).await;
    assert_eq!(
        auth(&mut c, &hs256(user("alice"))).await,
        json!({"type":"authenticated","userId":"alice"})
    );

    let forged = encode(
        &Header::new(Algorithm::HS256),
        &user("mallory"),
        &EncodingKey::from_secret(b"not-the-secret").unwrap(),
    )
    .unwrap();
    let expired = hs256(json!({"sub":"bob","exp": now_s() - 3600}));
    let not_yet = hs256(json!({"sub":"bob","exp": now_s() + 3600, "nbf": now_s() + 600}));
    let wrong_alg = encode(
        &Header::new(Algorithm::HS384),
        &user("bob"),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    // alg "none": a header that claims no signature, and none.
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg":"none","typ":"JWT"})),
        b64(&user("bob"))
    );
    for token in [
        forged,
        expired,
        not_yet,
        wrong_alg,
        none,
        "not.a.token".to_string(),
    ] {
        let mut c = Client::connect(server.local_addr()).await;
        let answer = auth(&mut c, &token).await;
        assert_eq!(answer["code"], "invalid_token", "{token}: {answer}");
    }
    // An exp too far away to count down to is taken as no expiry, not a crash.
    let mut far = Client::connect(server.local_addr()).await;
    let forever = hs256(json!({"sub":"zoe","exp": u64::MAX}));
    assert_eq!(auth(&mut far, &forever).await["userId"], "zoe");
    far.join("r").await;
    // Without a key, the client's word is not taken.
    let mut c = Client::connect(server.local_addr()).await;
    c.send(json!({"type":"auth","userId":"admin"})).await;
    c.expect_error("invalid_token").await;
}

#[tokio::test]
async fn the_token_may_come_with_the_upgrade() {
    let server = start(with_secret).await;
    let addr = server.local_addr();
    let token = hs256(user("carol"));
    let mut by_query = Client::connect_path(addr, &format!("/ws?token={token}")).await;
    assert_eq!(
        by_query.next_message().await,
        json!({"type":"authenticated","userId":"carol"})
    );
    // Authorization: Bearer, as a backend's WebSocket client sends it.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    use futures_util::StreamExt;
    let first = ws.next().await.unwrap().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(first.to_text().unwrap()).unwrap(),
        json!({"type":"authenticated","userId":"carol"})
    );
}

#[tokio::test]
async fn rs256_and_es256_tokens_are_checked_with_a_public_key_file() {
    for (public, private, alg) in [
        ("rsa-public.pem", "rsa-private.pem", Algorithm::RS256),
        ("ec-public.pem", "ec-private.pem", Algorithm::ES256),
    ] {
        let key = fixture(public).to_string_lossy().to_string();
        let server = start(move |c| c.auth.jwt_public_key = key).await;
        let pem = std::fs::read(fixture(private)).unwrap();
        let signing = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let token = encode(&Header::new(alg), &user("dave"), &signing).unwrap();
        let mut c = Client::connect(server.local_addr()).await;
        assert_eq!(auth(&mut c, &token).await["userId"], "dave", "{alg:?}");
        // The same claims signed with the HS256 secret are not accepted by a key node.
        let mut c = Client::connect(server.local_addr()).await;
        assert_eq!(
            auth(&mut c, &hs256(user("dave"))).await["code"],
            "invalid_token"
        );
    }
}

#[tokio::test]
async fn auth_required_refuses_everything_before_auth() {
    let server = start(|c| {
        with_secret(c);
        c.auth.required = true;
    })
    .await;
    let mut c = Client::connect(server.local_addr()).await;
    c.send(json!({"type":"join","roomId":"r"})).await;
    c.expect_error("unauthenticated").await;
    auth(&mut c, &hs256(user("erin"))).await;
    c.join("r").await;
}

#[tokio::test]
async fn room_claims_allow_and_deny_joins_and_publishes() {
    let server = start(with_secret).await;
    let token = hs256(json!({
        "sub": "fan", "exp": now_s() + 3600,
        "rooms": ["scores:*"], "publish": ["scores:chat-*"]
    }));
    let mut c = Client::connect(server.local_addr()).await;
    auth(&mut c, &token).await;
    c.join("scores:m1").await;
    c.send(json!({"type":"join","roomId":"admin:console"}))
        .await;
    c.expect_error("forbidden").await;
    c.send(json!({"type":"message","roomId":"scores:m1","content":"fake score"}))
        .await;
    c.expect_error("forbidden").await;
    c.join("scores:chat-1").await;
    c.send(json!({"type":"message","roomId":"scores:chat-1","content":"hi"}))
        .await;
    assert_eq!(c.next_room_message().await["content"], "hi");
}

#[tokio::test]
async fn client_publish_policy_makes_anonymous_sockets_read_only() {
    let server = start(|c| {
        with_secret(c);
        c.limits.client_publish = ClientPublish::Authenticated;
    })
    .await;
    let addr = server.local_addr();
    let mut anonymous = Client::connect(addr).await;
    anonymous.join("scores:m1").await;
    anonymous
        .send(json!({"type":"message","roomId":"scores:m1","content":"spam"}))
        .await;
    anonymous.expect_error("forbidden").await;
    // The backend's path stays open.
    let (status, _) = api_publish(addr, &json!({"roomId":"scores:m1","content":"goal"})).await;
    assert_eq!(status, 200);
    assert_eq!(anonymous.next_room_message().await["content"], "goal");
}

#[tokio::test]
async fn a_trusted_publisher_is_not_throttled_while_others_are() {
    // Default limits: 100 publishes/s with a burst of 200 for ordinary sockets.
    let server = start(|c| c.auth.jwt_secret = SECRET.into()).await;
    let addr = server.local_addr();
    let mut reader = Client::connect(addr).await;
    reader.join("ticker:ACME").await;
    let feed_token = hs256(json!({"sub":"feed","exp": now_s() + 3600, "publish": ["ticker:*"]}));
    let mut feed = Client::connect_path(addr, &format!("/ws?token={feed_token}")).await;
    feed.expect_type("authenticated").await;
    let burst: Vec<Value> = (0..1000)
        .map(|seq| json!({"type":"message","roomId":"ticker:ACME","content":seq}))
        .collect();
    feed.send_burst(&burst).await;
    for seq in 0..1000 {
        assert_eq!(reader.next_room_message().await["content"], seq);
    }
    // An untrusted socket with the same burst is limited.
    let mut crowd = Client::connect(addr).await;
    crowd.send_burst(&burst).await;
    crowd.expect_error("rate_limited").await;
}

#[tokio::test]
async fn an_expired_token_warns_then_closes_unless_renewed() {
    let server = start(|c| {
        with_secret(c);
        c.auth.expiry_grace_s = 1;
    })
    .await;
    let addr = server.local_addr();
    // Expires in about a second (exp is whole seconds; the node allows no extra leeway
    // once it is connected).
    let short = hs256(json!({"sub":"gus","exp": now_s() + 2}));
    let mut renewed = Client::connect(addr).await;
    auth(&mut renewed, &short).await;
    renewed.expect_error("token_expired").await;
    auth(&mut renewed, &hs256(user("gus"))).await;
    renewed.join("r").await;

    let mut lapsed = Client::connect(addr).await;
    auth(&mut lapsed, &hs256(json!({"sub":"hal","exp": now_s() + 2}))).await;
    lapsed.expect_error("token_expired").await;
    assert_eq!(
        lapsed.expect_close().await,
        (1008, "token expired".to_string())
    );
}

#[tokio::test]
async fn only_a_publish_claim_of_exactly_star_may_broadcast() {
    let server = start(|c| {
        with_secret(c);
        c.limits.client_broadcast = true;
    })
    .await;
    let addr = server.local_addr();
    let mut watcher = Client::connect(addr).await;
    watcher.join("w").await;
    // Globs that match the string "*" without being it: not a grant to reach everyone.
    for claim in [
        json!(["?"]),
        json!(["[*]"]),
        json!(["**"]),
        json!(["scores:*", "?*"]),
    ] {
        let token = hs256(json!({"sub":"fan","exp": now_s() + 3600, "publish": claim}));
        let mut c = Client::connect(addr).await;
        auth(&mut c, &token).await;
        c.send(json!({"type":"broadcast","payload":{"forged":true}}))
            .await;
        let refused = c.expect_error("forbidden").await;
        assert!(
            refused["message"].as_str().unwrap().contains("\"*\""),
            "{claim}: {refused}"
        );
    }
    let token = hs256(json!({"sub":"ops","exp": now_s() + 3600, "publish": ["scores:*", "*"]}));
    let mut ops = Client::connect(addr).await;
    auth(&mut ops, &token).await;
    ops.send(json!({"type":"broadcast","payload":{"real":true}}))
        .await;
    // The first thing everyone gets is the real one: none of the forged ones went out.
    assert_eq!(watcher.next_message().await, json!({"real":true}));
}

#[tokio::test]
async fn an_empty_user_id_is_refused_as_an_empty_sub_is() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(server.local_addr()).await;
    c.send(json!({"type":"auth","userId":""})).await;
    let refused = c.expect_error("invalid_token").await;
    assert!(
        refused["message"].as_str().unwrap().contains("userId"),
        "{refused}"
    );
    // Still anonymous: a direct message needs an identity.
    c.send(json!({"type":"direct_message","toUserId":"x","content":1}))
        .await;
    c.expect_error("unauthenticated").await;
    c.send(json!({"type":"auth","userId":"ann"})).await;
    assert_eq!(
        c.next_message().await,
        json!({"type":"authenticated","userId":"ann"})
    );
}
