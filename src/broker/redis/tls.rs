//! Redis over TLS (`rediss://` URLs): the clients an engine connects with trust
//! `redis.tls_ca_file` (else the system's roots) and present `redis.tls_cert_file` /
//! `redis.tls_key_file` when given. A connection refused for its certificates says
//! which keys to look at.

use redis::{Client, ConnectionAddr, ConnectionInfo, RedisError, TlsCertificates};

use crate::config::RedisConfig;

/// The certificates of `redis.tls_*`, read once per engine; `None` when none is set.
pub fn certificates(redis: &RedisConfig) -> Result<Option<TlsCertificates>, String> {
    let read =
        |key: &str, path: &str| std::fs::read(path).map_err(|e| format!("{key} {path}: {e}"));
    let root_cert = match redis.tls_ca_file.as_str() {
        "" => None,
        path => Some(read("redis.tls_ca_file", path)?),
    };
    let client_tls = match (redis.tls_cert_file.as_str(), redis.tls_key_file.as_str()) {
        ("", _) | (_, "") => None,
        (cert, key) => Some(redis::ClientTlsConfig {
            client_cert: read("redis.tls_cert_file", cert)?,
            client_key: read("redis.tls_key_file", key)?,
        }),
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// A client for `info`: over TLS with the configured certificates when the URL is
/// `rediss://`, else as the URL says.
pub fn client(info: ConnectionInfo, certs: Option<&TlsCertificates>) -> Result<Client, RedisError> {
    if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        return Client::open(info);
    }
    // redis-rs takes rustls's process-wide provider; the node uses ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match certs {
        Some(certs) => Client::build_with_tls(info, certs.clone()),
        None => Client::open(info),
    }
}

/// A connection error, with the keys to check when the TLS handshake refused a
/// certificate (a CA that did not sign the server's, a client certificate the server
/// does not accept).
pub fn explain(e: &RedisError) -> String {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if lower.contains("certificate")
        || lower.contains("unknownissuer")
        || lower.contains("handshake")
    {
        format!("{text} (TLS: is the server's certificate signed by the CA in redis.tls_ca_file? does the server accept redis.tls_cert_file?)")
    } else {
        text
    }
}
