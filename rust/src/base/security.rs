//! What a task trusts: a cluster token that every call to it must carry, as gRPC metadata
//! `authorization: Bearer <token>`, and TLS: the task's certificate and key, and the CA every
//! peer's certificate must chain to (mutual: a caller shows its certificate too). Without either
//! a task admits every caller over plaintext, as before.

use std::sync::Arc;

use http::HeaderValue;
use subtle::ConstantTimeEq;

use super::errors::{Error, Result};

/// The metadata key of the token.
pub const AUTHORIZATION: &str = "authorization";

/// A task's TLS material, PEM-encoded.
#[derive(Clone)]
pub struct TlsPem {
    /// The CA (one or more certificates) that peers' certificates must chain to.
    pub ca: Vec<u8>,
    /// This task's certificate chain, shown to peers both as server and as client.
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("TlsPem { .. }")
    }
}

#[derive(Clone, Debug)]
pub struct Security {
    /// `Bearer <token>`, as a caller sends it.
    authorization: Option<Arc<HeaderValue>>,
    /// Every connection, both ways, is TLS with these.
    pub tls: Option<Arc<TlsPem>>,
    /// Health checks are answered without the token (probes and load balancers ask them).
    pub open_health: bool,
}

impl Security {
    /// No token: every caller is admitted.
    pub fn open() -> Self {
        Self {
            authorization: None,
            tls: None,
            open_health: true,
        }
    }

    /// No token, health as `open_health` says (with TLS, certificates alone authenticate).
    pub fn without_token(open_health: bool) -> Self {
        Self {
            open_health,
            ..Self::open()
        }
    }

    /// Every connection is TLS with `tls` (mutual), besides any token.
    pub fn with_tls(mut self, tls: TlsPem) -> Self {
        self.tls = Some(Arc::new(tls));
        self
    }

    /// Calls must carry `token`: visible ASCII, as an HTTP/2 header value can hold it.
    pub fn with_token(token: &[u8], open_health: bool) -> Result<Self> {
        if token.is_empty() || !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid_argument(
                "a cluster token is one or more visible ASCII characters (no spaces)",
            ));
        }
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(token);
        let mut value = HeaderValue::from_bytes(&value)
            .map_err(|e| Error::invalid_argument(format!("an unusable cluster token: {e}")))?;
        value.set_sensitive(true);
        Ok(Self {
            authorization: Some(Arc::new(value)),
            tls: None,
            open_health,
        })
    }

    /// What a caller sends, if anything.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_deref()
    }

    /// Whether a call carrying `authorization` is admitted; compared in constant time, so the
    /// time taken says nothing of how much of a guess was right.
    pub fn admits(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(expected) = &self.authorization else {
            return true;
        };
        let given = authorization.map_or(&[][..], HeaderValue::as_bytes);
        bool::from(given.ct_eq(expected.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_is_admitted() {
        let security = Security::with_token(b"s3cret-token", true).unwrap();
        let right = HeaderValue::from_static("Bearer s3cret-token");
        assert!(security.admits(Some(&right)));
        for wrong in ["Bearer s3cret-tokeN", "Bearer s3cret", "s3cret-token", ""] {
            assert!(
                !security.admits(Some(&HeaderValue::from_static(wrong))),
                "{wrong:?}"
            );
        }
        assert!(!security.admits(None));
        assert!(Security::open().admits(None));
        assert!(Security::with_token(b"with space", true).is_err());
        assert!(Security::with_token(b"", true).is_err());
    }
}
