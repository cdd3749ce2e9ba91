//! Who a socket is: identities from JWTs, checked once, and what they allow.
//!
//! With `auth.jwt_secret` (HS256) or `auth.jwt_public_key` (RS256 or ES256) only a valid
//! token gives an identity: its `sub` is the user id, `exp` (required) and `nbf` are
//! checked, and the optional claims `rooms` and `publish` (room globs, as in `[[rooms]]`)
//! bound what the user may join and publish to; a `publish` claim also makes the socket a
//! trusted publisher. Without either, `{"type":"auth","userId":U}` is taken as said, as
//! the reference servers do: that mode trusts the client.

use std::sync::Arc;

use globset::{Glob, GlobMatcher};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{AuthConfig, ConfigError};

/// A socket's identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: Arc<str>,
    /// Rooms the user may join; `None`: any.
    rooms: Option<Vec<GlobMatcher>>,
    /// Rooms the user may publish to; `None`: as `limits.client_publish` says.
    publish: Option<Vec<GlobMatcher>>,
    /// The `publish` claim holds exactly `"*"`: the user may broadcast. Decided from the
    /// claim's text, never by matching globs against `*` (`?` and `[*]` match it too).
    broadcast: bool,
    /// The token's `exp`, seconds since the epoch; `None` for a trusted `userId`.
    pub expires_at: Option<u64>,
}

impl Identity {
    pub fn may_join(&self, room: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|globs| globs.iter().any(|g| g.is_match(room)))
    }

    /// `None` when the token says nothing about publishing.
    pub fn may_publish(&self, room: &str) -> Option<bool> {
        self.publish
            .as_ref()
            .map(|globs| globs.iter().any(|g| g.is_match(room)))
    }

    /// A token whose `publish` claim includes `"*"` itself: it may broadcast.
    pub fn may_broadcast(&self) -> bool {
        self.broadcast
    }

    /// A token that grants publishing: the socket is a trusted publisher.
    pub fn grants_publishing(&self) -> bool {
        self.publish.as_ref().is_some_and(|globs| !globs.is_empty())
    }
}

/// Why a token gives no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("this node checks tokens: send {{\"type\":\"auth\",\"token\":JWT}}")]
    TokenRequired,
    #[error("this node has no key to check tokens with: send {{\"type\":\"auth\",\"userId\":U}}")]
    NoKey,
    #[error("userId must not be empty")]
    EmptyUserId,
}

pub struct Authenticator {
    /// `None`: no secret or key configured; `userId` is trusted.
    jwt: Option<(DecodingKey, Validation)>,
    /// The configured key could not be loaded: nothing is trusted.
    broken: bool,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: Option<u64>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<Vec<String>>,
}

impl Authenticator {
    /// From `[auth]`; a key that cannot be read names the key.
    pub fn new(config: &AuthConfig) -> Result<Authenticator, ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid { key, reason };
        let jwt = match (
            config.jwt_secret.is_empty(),
            config.jwt_public_key.is_empty(),
        ) {
            (true, true) => None,
            (false, false) => {
                return Err(invalid(
                    "auth.jwt_secret",
                    "give either auth.jwt_secret or auth.jwt_public_key, not both".into(),
                ))
            }
            (false, true) => {
                let key = DecodingKey::from_secret(config.jwt_secret.as_bytes())
                    .map_err(|e| invalid("auth.jwt_secret", e.to_string()))?;
                Some((key, validation(Algorithm::HS256)))
            }
            (true, false) => {
                let pem = std::fs::read(&config.jwt_public_key).map_err(|e| {
                    invalid(
                        "auth.jwt_public_key",
                        format!("{}: {e}", config.jwt_public_key),
                    )
                })?;
                let rsa = DecodingKey::from_rsa_pem(&pem).map(|k| (k, Algorithm::RS256));
                let (key, alg) = rsa
                    .or_else(|_| DecodingKey::from_ec_pem(&pem).map(|k| (k, Algorithm::ES256)))
                    .map_err(|e| {
                        invalid(
                            "auth.jwt_public_key",
                            format!("not an RSA or EC P-256 public key in PEM: {e}"),
                        )
                    })?;
                Some((key, validation(alg)))
            }
        };
        Ok(Authenticator { jwt, broken: false })
    }

    /// For a node built with a key that cannot be loaded (`Server::bind` refuses those
    /// first): no token is valid and no `userId` is trusted.
    pub fn refusing() -> Authenticator {
        Authenticator {
            jwt: None,
            broken: true,
        }
    }

    /// Whether identities come from tokens (else the client's word).
    pub fn checks_tokens(&self) -> bool {
        self.jwt.is_some() || self.broken
    }

    /// The identity a token proves.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let Some((key, validation)) = &self.jwt else {
            return Err(if self.broken {
                AuthError::Invalid("the node's key could not be loaded".into())
            } else {
                AuthError::NoKey
            });
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("sub is empty".into()));
        }
        let broadcast = claims
            .publish
            .as_ref()
            .is_some_and(|patterns| patterns.iter().any(|p| p == "*"));
        Ok(Identity {
            user_id: Arc::from(claims.sub),
            broadcast,
            rooms: globs(claims.rooms, "rooms")?,
            publish: globs(claims.publish, "publish")?,
            expires_at: claims.exp,
        })
    }

    /// The reference servers' `{"type":"auth","userId":U}`: only without a key.
    pub fn trust(&self, user_id: &str) -> Result<Identity, AuthError> {
        if self.checks_tokens() {
            return Err(AuthError::TokenRequired);
        }
        // As a token's empty `sub`: an empty id is nobody, and would be everybody's.
        if user_id.is_empty() {
            return Err(AuthError::EmptyUserId);
        }
        Ok(Identity {
            user_id: Arc::from(user_id),
            broadcast: false,
            rooms: None,
            publish: None,
            expires_at: None,
        })
    }
}

/// One algorithm only: a token signed any other way (or `alg: none`) is refused.
fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.validate_nbf = true;
    v.leeway = 5;
    v
}

fn globs(
    patterns: Option<Vec<String>>,
    claim: &str,
) -> Result<Option<Vec<GlobMatcher>>, AuthError> {
    patterns
        .map(|patterns| {
            patterns
                .iter()
                .map(|p| {
                    Glob::new(p)
                        .map(|g| g.compile_matcher())
                        .map_err(|e| AuthError::Invalid(format!("{claim} claim: {p:?}: {e}")))
                })
                .collect()
        })
        .transpose()
}
