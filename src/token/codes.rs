//! Authorization codes (RFC 6749 §4.1): single-use, 60 seconds, bound to the client,
//! the redirect URI, the PKCE challenge and the scope. Stored, like tokens, as digests.
//!
//! A used code is kept for a while after use so that a replay can be recognised and the
//! tokens issued from the code revoked (RFC 6749 §4.1.2).

use std::sync::Arc;

use base64::Engine;
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::Error;
use crate::token::store::{digest, now_millis, TokenDigest};

/// How long a used code is remembered for replay detection after it expires.
const REPLAY_MEMORY_MS: u64 = 10 * 60_000;

/// What a code was issued for.
#[derive(Debug, Clone)]
pub struct CodeGrant {
    /// The client that asked.
    pub client_id: Arc<str>,
    /// The redirect URI the code was sent to.
    pub redirect_uri: String,
    /// Whether the authorization request named the redirect URI (then the token request
    /// must name it too, RFC 6749 §4.1.3).
    pub redirect_uri_given: bool,
    /// The S256 PKCE challenge, if one was sent.
    pub code_challenge: Option<String>,
    /// The scope granted.
    pub scope: String,
    /// The user who signed in.
    pub username: Arc<str>,
}

#[derive(Debug)]
struct CodeRecord {
    grant: CodeGrant,
    expires_at: u64,
    used: bool,
    /// The token family issued from this code, for revocation on replay.
    family: Option<Uuid>,
}

/// Why a code was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum CodeError {
    /// Unknown, expired, or issued to another client.
    Invalid,
    /// Used before: the tokens issued from it are to be revoked.
    Replayed(Option<Uuid>),
    /// The caller's check failed (redirect URI, PKCE); the code is spent all the same.
    Rejected(Error),
}

/// The table of outstanding codes.
#[derive(Default)]
pub struct CodeStore {
    codes: DashMap<TokenDigest, CodeRecord>,
}

/// Whether `verifier` is a well-formed PKCE verifier or challenge (RFC 7636 §4.1):
/// 43 to 128 unreserved characters.
pub fn is_pkce_string(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// S256 of a verifier, compared with the challenge in constant time.
pub fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(Sha256::digest(verifier.as_bytes()));
    computed.as_bytes().ct_eq(challenge.as_bytes()).into()
}

impl CodeStore {
    /// Stores a grant for `lifetime` and returns its code (256 random bits, base64url).
    pub fn issue(&self, grant: CodeGrant, lifetime: std::time::Duration) -> Result<String, Error> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes)
            .map_err(|_| Error::Internal("the system random generator failed".into()))?;
        let code = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        self.codes.insert(
            digest(&code),
            CodeRecord {
                grant,
                expires_at: now_millis() + lifetime.as_millis() as u64,
                used: false,
                family: None,
            },
        );
        Ok(code)
    }

    /// Redeems a code for `client_id`: spends it, then runs `check` on its grant.
    ///
    /// Any attempt spends the code, failed ones included (RFC 6749 §4.1.2: single use):
    /// a code presented by the wrong client, or with the wrong redirect URI or PKCE
    /// verifier, has leaked or is being guessed at, and must not be tried again.
    pub fn redeem(
        &self,
        code: &str,
        client_id: &str,
        check: impl FnOnce(&CodeGrant) -> Result<(), Error>,
    ) -> Result<CodeGrant, CodeError> {
        let Some(mut record) = self.codes.get_mut(&digest(code)) else {
            return Err(CodeError::Invalid);
        };
        if record.used {
            return Err(CodeError::Replayed(record.family));
        }
        record.used = true;
        if &*record.grant.client_id != client_id || record.expires_at <= now_millis() {
            return Err(CodeError::Invalid);
        }
        check(&record.grant).map_err(CodeError::Rejected)?;
        Ok(record.grant.clone())
    }

    /// Records the token family issued from a code.
    pub fn bind_family(&self, code: &str, family: Uuid) {
        if let Some(mut record) = self.codes.get_mut(&digest(code)) {
            record.family = Some(family);
        }
    }

    /// Drops codes past their life (used ones after the replay memory too).
    pub fn sweep(&self) {
        let now = now_millis();
        self.codes.retain(|_, r| {
            let keep_until = if r.used {
                r.expires_at + REPLAY_MEMORY_MS
            } else {
                r.expires_at
            };
            keep_until > now
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> CodeGrant {
        CodeGrant {
            client_id: "spa".into(),
            redirect_uri: "https://app/cb".into(),
            redirect_uri_given: true,
            code_challenge: None,
            scope: "read".into(),
            username: "alex".into(),
        }
    }

    #[test]
    fn rfc7636_appendix_b_example() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert!(is_pkce_string(verifier));
        assert!(pkce_matches(
            verifier,
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(!pkce_matches(
            verifier,
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cX"
        ));
        assert!(!is_pkce_string("short"));
        assert!(!is_pkce_string(&"a".repeat(129)));
        assert!(!is_pkce_string(&format!("{}+", "a".repeat(43))));
    }

    #[test]
    fn single_use_and_replay_reports_the_family() {
        let store = CodeStore::default();
        let issue = || {
            store
                .issue(grant(), std::time::Duration::from_secs(60))
                .unwrap()
        };
        // A failed attempt spends the code: the wrong client, or a failed check.
        let code = issue();
        assert_eq!(
            store.redeem(&code, "other", |_| Ok(())).unwrap_err(),
            CodeError::Invalid
        );
        assert_eq!(
            store.redeem(&code, "spa", |_| Ok(())).unwrap_err(),
            CodeError::Replayed(None)
        );
        let code = issue();
        let rejected = store.redeem(&code, "spa", |_| Err(Error::InvalidGrant("pkce".into())));
        assert!(matches!(rejected, Err(CodeError::Rejected(_))));
        assert_eq!(
            store.redeem(&code, "spa", |_| Ok(())).unwrap_err(),
            CodeError::Replayed(None)
        );
        let code = issue();
        assert_eq!(
            store.redeem(&code, "spa", |_| Ok(())).unwrap().scope,
            "read"
        );
        let family = Uuid::new_v4();
        store.bind_family(&code, family);
        assert_eq!(
            store.redeem(&code, "spa", |_| Ok(())).unwrap_err(),
            CodeError::Replayed(Some(family))
        );
        assert_eq!(
            store.redeem("nope", "spa", |_| Ok(())).unwrap_err(),
            CodeError::Invalid
        );
    }
}
