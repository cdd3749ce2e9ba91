//! What one socket may do, by who it is: its identity (from `auth`, or a token or the
//! API key on its upgrade), the node's policy (`auth.required`, `limits.client_publish`,
//! `limits.client_broadcast`), the token's room claims, and the token's expiry.

use std::time::{Duration, Instant};

use crate::auth::{AuthError, Identity};
use crate::config::{ClientPublish, Config};
use crate::node::Node;
use crate::protocol::{now_ms, ErrorCode, ProtocolError};

/// Credentials that came with the upgrade request.
#[derive(Debug, Default, Clone)]
pub struct UpgradeAuth {
    /// `?token=` or `Authorization: Bearer`.
    pub token: Option<String>,
    /// `Authorization: apikey KEY` with the node's `api.key`: a trusted backend.
    pub api_key: bool,
}

pub struct Access {
    identity: Option<Identity>,
    /// The upgrade carried the API key: a backend, trusted with everything.
    api_key: bool,
    required: bool,
    client_publish: ClientPublish,
    client_broadcast: bool,
    checks_tokens: bool,
    grace: Duration,
    /// When the token expires; then, when the grace period after it ends.
    expires: Option<Instant>,
    grace_until: Option<Instant>,
}

/// What the token's expiry asks of the socket now.
pub enum Expiry {
    /// It expired: tell the client, which may send a fresh token in the grace period.
    Warn(ProtocolError),
    /// The grace period ended without a fresh token: close.
    Close,
}

impl Access {
    pub fn new(config: &Config, checks_tokens: bool, upgrade_api_key: bool) -> Access {
        Access {
            identity: None,
            api_key: upgrade_api_key,
            required: config.auth.required,
            client_publish: config.limits.client_publish,
            client_broadcast: config.limits.client_broadcast,
            checks_tokens,
            grace: Duration::from_secs(config.auth.expiry_grace_s),
            expires: None,
            grace_until: None,
        }
    }

    /// Takes a token or a `userId` as the socket's identity.
    pub fn authenticate(
        &mut self,
        node: &Node,
        token: Option<&str>,
        user_id: Option<&str>,
    ) -> Result<&Identity, ProtocolError> {
        let verified = match (token, user_id) {
            (Some(token), _) => node.auth().verify(token),
            (None, Some(user)) => node.auth().trust(user),
            (None, None) => Err(AuthError::Invalid("no token".into())),
        };
        let identity =
            verified.map_err(|e| ProtocolError::new(ErrorCode::InvalidToken, e.to_string()))?;
        if let Some(current) = &self.identity {
            if current.user_id != identity.user_id {
                return Err(ProtocolError::new(
                    ErrorCode::InvalidToken,
                    "a socket's identity cannot change; open another socket for another user",
                ));
            }
        }
        // An `exp` too far away to represent is as good as none.
        self.expires = identity.expires_at.and_then(|exp| {
            let left_ms = exp.saturating_mul(1000).saturating_sub(now_ms());
            Instant::now().checked_add(Duration::from_millis(left_ms))
        });
        self.grace_until = None;
        Ok(self.identity.insert(identity))
    }

    /// With `auth.required`, every frame but `auth` needs an identity (or the API key).
    pub fn check_authenticated(&self) -> Result<(), ProtocolError> {
        if self.required && self.identity.is_none() && !self.api_key {
            return Err(ProtocolError::new(
                ErrorCode::Unauthenticated,
                "this node requires auth first: send {\"type\":\"auth\",\"token\":JWT}",
            ));
        }
        Ok(())
    }

    pub fn may_join(&self, room: &str) -> Result<(), ProtocolError> {
        match &self.identity {
            Some(identity) if !identity.may_join(room) => Err(forbidden(format!(
                "your token's rooms claim does not allow joining {room:?}"
            ))),
            _ => Ok(()),
        }
    }

    pub fn may_publish(&self, room: &str) -> Result<(), ProtocolError> {
        if self.api_key {
            return Ok(());
        }
        if let Some(allowed) = self.identity.as_ref().and_then(|i| i.may_publish(room)) {
            return if allowed {
                Ok(())
            } else {
                Err(forbidden(format!(
                    "your token's publish claim does not allow publishing to {room:?}"
                )))
            };
        }
        match self.client_publish {
            ClientPublish::Any => Ok(()),
            ClientPublish::Authenticated if self.identity.is_some() => Ok(()),
            ClientPublish::Authenticated => Err(forbidden(
                "publishing needs an identity here (limits.client_publish = \"authenticated\"): send auth first".into(),
            )),
            ClientPublish::None => Err(forbidden(
                "sockets do not publish here (limits.client_publish = \"none\"); backends use POST /api/publish".into(),
            )),
        }
    }

    /// A broadcast reaches every socket as sent: off unless `limits.client_broadcast`, and
    /// with tokens checked, only for a token that may publish to `*` (or the API key).
    pub fn may_broadcast(&self) -> Result<(), ProtocolError> {
        if !self.client_broadcast {
            return Err(forbidden(
                "client broadcasts are off (limits.client_broadcast = false): a broadcast reaches every socket as sent; publish it through POST /api/publish".into(),
            ));
        }
        if self.api_key || !self.checks_tokens {
            return Ok(());
        }
        match &self.identity {
            Some(identity) if identity.may_broadcast() => Ok(()),
            _ => Err(forbidden(
                "a broadcast needs a token whose publish claim includes \"*\"".into(),
            )),
        }
    }

    /// A trusted publisher (a token granting publishing, or the API key) is limited by
    /// `limits.trusted_publish_rate` instead of `limits.publish_rate`.
    pub fn trusted(&self) -> bool {
        self.api_key
            || self
                .identity
                .as_ref()
                .is_some_and(Identity::grants_publishing)
    }

    /// When the token's expiry next asks something of the socket.
    pub fn deadline(&self) -> Option<Instant> {
        self.grace_until.or(self.expires)
    }

    /// The deadline passed.
    pub fn expired(&mut self) -> Expiry {
        if self.grace_until.is_some() {
            return Expiry::Close;
        }
        self.expires = None;
        self.grace_until = Some(Instant::now() + self.grace);
        Expiry::Warn(ProtocolError::new(
            ErrorCode::TokenExpired,
            format!(
                "your token expired: send a fresh one within {} s or the socket closes",
                self.grace.as_secs()
            ),
        ))
    }
}

fn forbidden(message: String) -> ProtocolError {
    ProtocolError::new(ErrorCode::Forbidden, message)
}
