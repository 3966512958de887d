//! The token table: a `DashMap` keyed by the SHA-256 digest of each token.
//!
//! The raw token exists only in the response that hands it out; a dump of this table
//! (or a snapshot of it) holds nothing a client could present. Lookups hash the
//! presented token and find its record; since the key is a digest, timing of the map's
//! comparisons reveals nothing about any live token.
//!
//! Tokens issued from one original grant form a family. Refresh tokens rotate: each is
//! good for one use, and presenting one that was already used revokes the whole family
//! (RFC 9700 §4.14.2), since either the client or a thief holds a copy that is stale.
//!
//! No guard of either map is ever held across an `.await`: every method here is
//! synchronous, and callers get owned data back.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use dashmap::DashMap;
use http::HeaderValue;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// SHA-256 of a token's text.
pub type TokenDigest = [u8; 32];

/// Digest of a presented token.
pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 256 bits from the OS CSPRNG, base64url without padding (43 characters).
fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Who an access token speaks for, with the upstream headers built once at issue time so
/// the per-request path only clones reference-counted values.
#[derive(Debug)]
pub struct Identity {
    /// The user; `None` for a client-credentials token.
    pub username: Option<Arc<str>>,
    /// The client the token was issued to.
    pub client_id: Arc<str>,
    /// The user's roles.
    pub roles: Vec<Box<str>>,
    /// Granted scope, space-separated.
    pub scope: Box<str>,
    /// This token record's public id.
    pub jti: Uuid,
    /// When the token was issued, ms since the epoch.
    pub issued_at: u64,
    /// When the token expires, ms since the epoch.
    pub expires_at: u64,
    /// `X-Authenticated-User`, when there is a user.
    pub user_header: Option<HeaderValue>,
    /// `X-Authenticated-Client`.
    pub client_header: HeaderValue,
    /// `X-Authenticated-Roles`: comma-separated.
    pub roles_header: HeaderValue,
    /// `X-Authenticated-Scope`.
    pub scope_header: HeaderValue,
    /// `X-Token-Id`.
    pub jti_header: HeaderValue,
}

impl Identity {
    /// Whether the token's scope includes `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scope.split(' ').any(|s| s == scope)
    }

    /// Whether the user has `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| &**r == role)
    }
}

/// What a grant was for: shared by all tokens of one family.
#[derive(Debug)]
pub struct Grant {
    /// The user; `None` for client credentials.
    pub username: Option<Arc<str>>,
    /// The client.
    pub client_id: Arc<str>,
    /// The scope originally granted; refreshes may narrow it, never widen it.
    pub scope: Box<str>,
}

#[derive(Debug)]
enum Record {
    Access {
        family: Uuid,
        identity: Arc<Identity>,
    },
    Refresh {
        family: Uuid,
        grant: Arc<Grant>,
        expires_at: u64,
        /// Rotated already: a second use is a replay.
        used: bool,
    },
}

impl Record {
    fn expires_at(&self) -> u64 {
        match self {
            Record::Access { identity, .. } => identity.expires_at,
            Record::Refresh { expires_at, .. } => *expires_at,
        }
    }
}

#[derive(Debug)]
struct Family {
    members: Vec<TokenDigest>,
    expires_at: u64,
}

/// What to issue.
pub struct IssueRequest<'a> {
    /// The family to add to (a refresh), or `None` to start one.
    pub family: Option<Uuid>,
    /// The user, if any.
    pub username: Option<Arc<str>>,
    /// The client.
    pub client_id: Arc<str>,
    /// The user's current roles.
    pub roles: &'a [String],
    /// Scope of the access token.
    pub scope: String,
    /// Scope the refresh token carries on (the original grant's).
    pub grant_scope: String,
    /// Access token lifetime, seconds.
    pub access_ttl: u64,
    /// Refresh token lifetime, seconds; `None` for no refresh token.
    pub refresh_ttl: Option<u64>,
}

/// Tokens handed out, to be sent to the client once.
#[derive(Debug)]
pub struct Issued {
    /// The bearer token.
    pub access_token: String,
    /// The refresh token, if one was issued.
    pub refresh_token: Option<String>,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Scope of the access token.
    pub scope: String,
    /// Public id of the access token record.
    pub jti: Uuid,
    /// The family the tokens belong to.
    pub family: Uuid,
}

/// Why a refresh token was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum RefreshError {
    /// Unknown, expired, revoked, or not a refresh token.
    Invalid,
    /// Issued to another client (RFC 6749 §6).
    WrongClient,
    /// Already used: the family is now revoked.
    Replayed,
    /// The caller's check of the grant failed; the token is left unused.
    Rejected(crate::error::Error),
}

/// The in-memory token table.
pub struct TokenStore {
    tokens: DashMap<TokenDigest, Record>,
    families: DashMap<Uuid, Family>,
}

impl Default for TokenStore {
    fn default() -> Self {
        // More shards than dashmap's default (4 × cores) keep a sweep, which write-locks
        // one shard at a time, from holding up lookups that hash to the same shard.
        TokenStore {
            tokens: DashMap::with_shard_amount(64),
            families: DashMap::with_shard_amount(64),
        }
    }
}

fn header(text: &str) -> HeaderValue {
    // Config validation keeps control characters out of names; any other byte is
    // allowed in a header value (obs-text), so this does not fail in practice.
    HeaderValue::from_bytes(text.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

impl TokenStore {
    /// Number of records (access and refresh tokens, expired ones not yet swept).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Issues an access token and, if asked, a refresh token.
    pub fn issue(&self, request: IssueRequest<'_>) -> Result<Issued, crate::error::Error> {
        let rng = |_| crate::error::Error::Internal("the system random generator failed".into());
        let now = now_millis();
        let jti = Uuid::new_v4();
        let access_token = new_token().map_err(rng)?;
        let refresh_token = request
            .refresh_ttl
            .map(|_| new_token())
            .transpose()
            .map_err(rng)?;
        let expires_at = now + request.access_ttl * 1000;
        let roles_header = header(&request.roles.join(","));
        let identity = Identity {
            user_header: request.username.as_deref().map(header),
            client_header: header(&request.client_id),
            roles_header,
            scope_header: header(&request.scope),
            jti_header: header(&jti.to_string()),
            username: request.username.clone(),
            client_id: request.client_id.clone(),
            roles: request.roles.iter().map(|r| r.as_str().into()).collect(),
            scope: request.scope.as_str().into(),
            jti,
            issued_at: now,
            expires_at,
        };
        let family = request.family.unwrap_or_else(Uuid::new_v4);
        let access_digest = digest(&access_token);
        let mut members = vec![access_digest];
        let mut family_expiry = expires_at;
        self.tokens.insert(
            access_digest,
            Record::Access {
                family,
                identity: Arc::new(identity),
            },
        );
        if let (Some(token), Some(ttl)) = (&refresh_token, request.refresh_ttl) {
            let refresh_digest = digest(token);
            let refresh_expiry = now + ttl * 1000;
            family_expiry = family_expiry.max(refresh_expiry);
            members.push(refresh_digest);
            self.tokens.insert(
                refresh_digest,
                Record::Refresh {
                    family,
                    grant: Arc::new(Grant {
                        username: request.username,
                        client_id: request.client_id,
                        scope: request.grant_scope.into(),
                    }),
                    expires_at: refresh_expiry,
                    used: false,
                },
            );
        }
        let mut entry = self.families.entry(family).or_insert_with(|| Family {
            members: Vec::new(),
            expires_at: 0,
        });
        entry.members.extend(members);
        entry.expires_at = entry.expires_at.max(family_expiry);
        drop(entry);

        Ok(Issued {
            access_token,
            refresh_token,
            expires_in: request.access_ttl,
            scope: request.scope,
            jti,
            family,
        })
    }

    /// The identity behind a live access token.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Identity>> {
        let now = now_millis();
        match self.tokens.get(&digest(token)).as_deref() {
            Some(Record::Access { identity, .. }) if identity.expires_at > now => {
                Some(identity.clone())
            }
            _ => None,
        }
    }

    /// Redeems a refresh token for `client_id`: runs `check` on its grant and, if that
    /// passes, marks the token used and returns the grant and family to issue into. A
    /// token already used revokes its family.
    pub fn redeem_refresh(
        &self,
        token: &str,
        client_id: &str,
        check: impl FnOnce(&Grant) -> Result<(), crate::error::Error>,
    ) -> Result<(Arc<Grant>, Uuid), RefreshError> {
        let now = now_millis();
        let replayed_family = {
            let Some(mut record) = self.tokens.get_mut(&digest(token)) else {
                return Err(RefreshError::Invalid);
            };
            let Record::Refresh {
                family,
                grant,
                expires_at,
                used,
            } = &mut *record
            else {
                return Err(RefreshError::Invalid);
            };
            if *expires_at <= now {
                return Err(RefreshError::Invalid);
            }
            if &*grant.client_id != client_id {
                return Err(RefreshError::WrongClient);
            }
            if *used {
                *family
            } else {
                check(grant).map_err(RefreshError::Rejected)?;
                *used = true;
                return Ok((grant.clone(), *family));
            }
        };
        self.revoke_family(replayed_family);
        Err(RefreshError::Replayed)
    }

    /// Revokes every token of a family.
    pub fn revoke_family(&self, family: Uuid) {
        // Remove the family first and release its guard before touching the token map:
        // no code path holds guards of both maps at once, so no lock-order deadlock.
        if let Some((_, family)) = self.families.remove(&family) {
            for member in family.members {
                self.tokens.remove(&member);
            }
        }
    }

    /// Drops expired records and families; returns how many records went.
    pub fn sweep(&self) -> usize {
        let now = now_millis();
        let before = self.tokens.len();
        self.tokens.retain(|_, record| record.expires_at() > now);
        self.families.retain(|_, family| family.expires_at > now);
        before.saturating_sub(self.tokens.len())
    }

    /// The family of a live access token (used by revocation).
    pub fn family_of_access(&self, token: &str) -> Option<Uuid> {
        match self.tokens.get(&digest(token)).as_deref() {
            Some(Record::Access { family, .. }) => Some(*family),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(store: &TokenStore, family: Option<Uuid>, access_ttl: u64) -> Issued {
        store
            .issue(IssueRequest {
                family,
                username: Some("alex".into()),
                client_id: "app".into(),
                roles: &["ROLE_A".to_owned(), "ROLE_B".to_owned()],
                scope: "read".into(),
                grant_scope: "read write".into(),
                access_ttl,
                refresh_ttl: Some(60),
            })
            .unwrap()
    }

    #[test]
    fn tokens_are_random_base64url_and_stored_only_as_digests() {
        let store = TokenStore::default();
        let a = issue(&store, None, 60);
        let b = issue(&store, None, 60);
        assert_eq!(a.access_token.len(), 43);
        assert!(a
            .access_token
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_ne!(a.access_token, b.access_token);
        assert_ne!(a.jti, b.jti);
        assert!(store.tokens.contains_key(&digest(&a.access_token)));
        let dump = format!("{:?}", store.tokens);
        assert!(!dump.contains(&a.access_token));
    }

    #[test]
    fn access_lookup_gives_identity_with_headers() {
        let store = TokenStore::default();
        let issued = issue(&store, None, 60);
        let identity = store.authenticate(&issued.access_token).unwrap();
        assert_eq!(identity.roles_header, "ROLE_A,ROLE_B");
        assert_eq!(identity.user_header.as_ref().unwrap(), "alex");
        assert_eq!(identity.jti, issued.jti);
        assert!(identity.has_scope("read") && !identity.has_scope("write"));
        // A refresh token is not a bearer token.
        assert!(store
            .authenticate(issued.refresh_token.as_ref().unwrap())
            .is_none());
        assert!(store.authenticate("nope").is_none());
    }

    #[test]
    fn expired_tokens_are_refused_then_swept() {
        let store = TokenStore::default();
        let issued = issue(&store, None, 0);
        assert!(store.authenticate(&issued.access_token).is_none());
        assert_eq!(
            store.sweep(),
            1,
            "the expired access token goes, the refresh stays"
        );
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn refresh_rotates_and_replay_revokes_the_family() {
        let store = TokenStore::default();
        let first = issue(&store, None, 60);
        let refresh = first.refresh_token.clone().unwrap();
        assert_eq!(
            store
                .redeem_refresh(&refresh, "other", |_| Ok(()))
                .unwrap_err(),
            RefreshError::WrongClient
        );
        let (grant, family) = store.redeem_refresh(&refresh, "app", |_| Ok(())).unwrap();
        assert_eq!(&*grant.scope, "read write");
        let second = issue(&store, Some(family), 60);
        assert!(store.authenticate(&second.access_token).is_some());

        assert_eq!(
            store
                .redeem_refresh(&refresh, "app", |_| Ok(()))
                .unwrap_err(),
            RefreshError::Replayed
        );
        assert!(store.authenticate(&first.access_token).is_none());
        assert!(store.authenticate(&second.access_token).is_none());
        assert_eq!(
            store
                .redeem_refresh(second.refresh_token.as_ref().unwrap(), "app", |_| Ok(()))
                .unwrap_err(),
            RefreshError::Invalid
        );
        assert!(store.is_empty());
    }

    #[test]
    fn a_failed_check_leaves_the_refresh_token_usable() {
        let store = TokenStore::default();
        let issued = issue(&store, None, 60);
        let refresh = issued.refresh_token.unwrap();
        let rejected = store.redeem_refresh(&refresh, "app", |_| {
            Err(crate::error::Error::InvalidScope("no".into()))
        });
        assert!(matches!(rejected, Err(RefreshError::Rejected(_))));
        assert!(store.redeem_refresh(&refresh, "app", |_| Ok(())).is_ok());
    }
}
