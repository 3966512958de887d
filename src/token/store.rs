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

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use dashmap::DashMap;
use http::HeaderValue;
use serde::{Deserialize, Serialize};
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

/// Who tokens speak for: a user (or none, for a client's own token), a client and the
/// user's roles, with their upstream headers built once. One is shared by every token
/// of the same user, client and roles, so a live token does not carry copies of them.
#[derive(Debug)]
pub struct Principal {
    /// The user; `None` for a client-credentials token.
    pub username: Option<Arc<str>>,
    /// The client the token was issued to.
    pub client_id: Arc<str>,
    /// The user's roles.
    pub roles: RoleSet,
    /// `X-Authenticated-User`, when there is a user.
    pub user_header: Option<HeaderValue>,
    /// `X-Authenticated-Client`.
    pub client_header: HeaderValue,
    /// `X-Authenticated-Roles`: comma-separated.
    pub roles_header: HeaderValue,
}

/// What an access token grants: its principal, and what is its own (id, times, scope),
/// with the upstream headers built once at issue time so the per-request path only
/// clones reference-counted values.
#[derive(Debug)]
pub struct Identity {
    /// Who the token speaks for (shared).
    pub principal: Arc<Principal>,
    /// This token record's public id.
    pub jti: Uuid,
    /// When the token was issued, ms since the epoch.
    pub issued_at: u64,
    /// When the token expires, ms since the epoch.
    pub expires_at: u64,
    /// `X-Authenticated-Scope`; also where the granted scope is kept.
    pub scope_header: HeaderValue,
    /// `X-Token-Id`.
    pub jti_header: HeaderValue,
}

/// An identity reads as its principal too (`identity.username`), as the two were one
/// struct before the principal was shared.
impl std::ops::Deref for Identity {
    type Target = Principal;

    fn deref(&self) -> &Principal {
        &self.principal
    }
}

impl Identity {
    fn new(
        interned: &Interner,
        username: Option<&str>,
        client_id: &str,
        roles: &[String],
        scope: &str,
        jti: Uuid,
        (issued_at, expires_at): (u64, u64),
    ) -> Identity {
        Identity {
            principal: interned.principal(username, client_id, roles),
            jti,
            issued_at,
            expires_at,
            scope_header: header(scope),
            jti_header: header(&jti.to_string()),
        }
    }

    /// The granted scope, space-separated.
    pub fn scope(&self) -> &str {
        self.scope_header.to_str().unwrap_or_default()
    }

    /// Whether the token's scope includes `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scope().split(' ').any(|s| s == scope)
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
        jti: Uuid,
        issued_at: u64,
        expires_at: u64,
        /// When it was rotated: a later use is a replay (after the grace period).
        used_at: Option<u64>,
    },
}

impl Record {
    fn expires_at(&self) -> u64 {
        match self {
            Record::Access { identity, .. } => identity.expires_at,
            Record::Refresh { expires_at, .. } => *expires_at,
        }
    }

    fn family(&self) -> Uuid {
        match self {
            Record::Access { family, .. } | Record::Refresh { family, .. } => *family,
        }
    }
}

#[derive(Debug)]
struct Family {
    members: Vec<TokenDigest>,
    expires_at: u64,
    username: Option<Arc<str>>,
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

/// What introspection (RFC 7662) reports about a live token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introspection {
    /// `true` for an access token, `false` for a refresh token.
    pub access: bool,
    /// The user, if any.
    pub username: Option<Arc<str>>,
    /// The client it was issued to.
    pub client_id: Arc<str>,
    /// Its scope.
    pub scope: String,
    /// Its record id.
    pub jti: Uuid,
    /// Issued at, ms since the epoch.
    pub issued_at: u64,
    /// Expires at, ms since the epoch.
    pub expires_at: u64,
    /// The user's roles as issued (access tokens).
    pub roles: Vec<String>,
}

/// Shared copies of the values that repeat across tokens (user and client names, role
/// sets) with their header forms, so a million tokens of a few thousand users do not
/// hold a million copies. Bounded by the configured users and clients; the scope is not
/// interned, since a client allowed any scope could make it grow without end.
#[derive(Default)]
struct Interner {
    texts: DashMap<Box<str>, (Arc<str>, HeaderValue)>,
    roles: DashMap<Box<str>, (RoleSet, HeaderValue)>,
    /// Keyed by the addresses of the interned user, client and role set (0 for no user):
    /// each principal holds those three, so while it is in the map (for ever) no other
    /// value can have their addresses.
    principals: DashMap<(usize, usize, usize), Arc<Principal>>,
}

/// A user's roles, shared by every token of the same role set.
pub type RoleSet = Arc<[Box<str>]>;

impl Interner {
    fn text(&self, text: &str) -> (Arc<str>, HeaderValue) {
        if let Some(found) = self.texts.get(text) {
            return found.clone();
        }
        let value = (Arc::from(text), header(text));
        self.texts.entry(text.into()).or_insert(value).clone()
    }

    fn principal(
        &self,
        username: Option<&str>,
        client_id: &str,
        roles: &[String],
    ) -> Arc<Principal> {
        let (username, user_header) = match username.map(|u| self.text(u)) {
            Some((name, header)) => (Some(name), Some(header)),
            None => (None, None),
        };
        let (client_id, client_header) = self.text(client_id);
        let (roles, roles_header) = self.roles(roles);
        let key = (
            username
                .as_ref()
                .map_or(0, |u| Arc::as_ptr(u).cast::<u8>() as usize),
            Arc::as_ptr(&client_id).cast::<u8>() as usize,
            Arc::as_ptr(&roles).cast::<Box<str>>() as usize,
        );
        if let Some(found) = self.principals.get(&key) {
            return found.clone();
        }
        let principal = Arc::new(Principal {
            username,
            client_id,
            roles,
            user_header,
            client_header,
            roles_header,
        });
        self.principals.entry(key).or_insert(principal).clone()
    }

    fn roles(&self, roles: &[String]) -> (RoleSet, HeaderValue) {
        let joined = roles.join(",");
        if let Some(found) = self.roles.get(joined.as_str()) {
            return found.clone();
        }
        let list: RoleSet = roles.iter().map(|r| r.as_str().into()).collect();
        let value = (list, header(&joined));
        self.roles.entry(joined.into()).or_insert(value).clone()
    }
}

/// Limits that a reload may change.
#[derive(Debug)]
struct Limits {
    max_live: AtomicUsize,
    max_families_per_user: AtomicUsize,
    refresh_grace_ms: AtomicU64,
}

/// The in-memory token table.
pub struct TokenStore {
    tokens: DashMap<TokenDigest, Record>,
    families: DashMap<Uuid, Family>,
    /// Each user's families, oldest first, for "expire all of a user's tokens" and the
    /// per-user cap.
    user_families: DashMap<Arc<str>, VecDeque<Uuid>>,
    interned: Interner,
    limits: Limits,
}

impl Default for TokenStore {
    fn default() -> Self {
        // More shards than dashmap's default (4 × cores) keep a sweep, which write-locks
        // one shard at a time, from holding up lookups that hash to the same shard.
        TokenStore {
            tokens: DashMap::with_shard_amount(64),
            families: DashMap::with_shard_amount(64),
            user_families: DashMap::with_shard_amount(64),
            interned: Interner::default(),
            limits: Limits {
                max_live: AtomicUsize::new(usize::MAX),
                max_families_per_user: AtomicUsize::new(usize::MAX),
                refresh_grace_ms: AtomicU64::new(0),
            },
        }
    }
}

fn header(text: &str) -> HeaderValue {
    // Config validation keeps control characters out of names; any other byte is
    // allowed in a header value (obs-text), so this does not fail in practice.
    HeaderValue::from_bytes(text.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

impl TokenStore {
    /// Applies `[tokens]` limits (at start and on reload).
    pub fn set_limits(
        &self,
        max_live: usize,
        max_families_per_user: usize,
        refresh_grace: std::time::Duration,
    ) {
        self.limits.max_live.store(max_live, Ordering::Relaxed);
        self.limits
            .max_families_per_user
            .store(max_families_per_user, Ordering::Relaxed);
        self.limits
            .refresh_grace_ms
            .store(refresh_grace.as_millis() as u64, Ordering::Relaxed);
    }

    /// Number of records (access and refresh tokens, expired ones not yet swept).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether `records` more records fit under `max_live_tokens`.
    pub fn has_room(&self, records: usize) -> bool {
        self.tokens.len() + records <= self.limits.max_live.load(Ordering::Relaxed)
    }

    /// Whether not even one more record fits: issuing must wait.
    pub fn is_full(&self) -> bool {
        !self.has_room(1)
    }

    /// Issues an access token and, if asked, a refresh token.
    pub fn issue(&self, request: IssueRequest<'_>) -> Result<Issued, crate::error::Error> {
        if !self.has_room(1 + usize::from(request.refresh_ttl.is_some())) {
            return Err(crate::error::Error::TemporarilyUnavailable(
                "the token table is full; try again later".into(),
            ));
        }
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
        let identity = Identity::new(
            &self.interned,
            request.username.as_deref(),
            &request.client_id,
            request.roles,
            &request.scope,
            jti,
            (now, expires_at),
        );
        let new_family = request.family.is_none();
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
                        username: request.username.clone(),
                        client_id: request.client_id,
                        scope: request.grant_scope.into(),
                    }),
                    jti: Uuid::new_v4(),
                    issued_at: now,
                    expires_at: refresh_expiry,
                    used_at: None,
                },
            );
        }
        self.add_to_family(family, members, family_expiry, request.username.clone());
        if let (true, Some(user)) = (new_family, request.username) {
            self.register_family(user, family);
        }

        Ok(Issued {
            access_token,
            refresh_token,
            expires_in: request.access_ttl,
            scope: request.scope,
            jti,
            family,
        })
    }

    fn add_to_family(
        &self,
        family: Uuid,
        members: Vec<TokenDigest>,
        expires_at: u64,
        username: Option<Arc<str>>,
    ) {
        let mut entry = self.families.entry(family).or_insert_with(|| Family {
            members: Vec::new(),
            expires_at: 0,
            username,
        });
        entry.members.extend(members);
        entry.expires_at = entry.expires_at.max(expires_at);
    }

    /// Records a user's new family and revokes the oldest beyond the per-user cap.
    fn register_family(&self, user: Arc<str>, family: Uuid) {
        let cap = self.limits.max_families_per_user.load(Ordering::Relaxed);
        let evicted: Vec<Uuid> = {
            let mut list = self.user_families.entry(user).or_default();
            list.push_back(family);
            let excess = list.len().saturating_sub(cap);
            list.drain(..excess).collect()
        };
        for old in evicted {
            self.revoke_family(old);
        }
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
    /// token already used revokes its family, unless it is presented again within the
    /// grace period (a client that lost the response to its refresh).
    pub fn redeem_refresh(
        &self,
        token: &str,
        client_id: &str,
        check: impl FnOnce(&Grant) -> Result<(), crate::error::Error>,
    ) -> Result<(Arc<Grant>, Uuid), RefreshError> {
        let now = now_millis();
        let grace = self.limits.refresh_grace_ms.load(Ordering::Relaxed);
        let replayed_family = {
            let Some(mut record) = self.tokens.get_mut(&digest(token)) else {
                return Err(RefreshError::Invalid);
            };
            let Record::Refresh {
                family,
                grant,
                expires_at,
                used_at,
                ..
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
            let within_grace = |at: u64| grace > 0 && now.saturating_sub(at) <= grace;
            match *used_at {
                Some(at) if !within_grace(at) => *family,
                _ => {
                    check(grant).map_err(RefreshError::Rejected)?;
                    used_at.get_or_insert(now);
                    return Ok((grant.clone(), *family));
                }
            }
        };
        self.revoke_family(replayed_family);
        Err(RefreshError::Replayed)
    }

    /// Revokes every token of a family.
    pub fn revoke_family(&self, family: Uuid) {
        // Remove the family first and release its guard before touching the other maps:
        // no code path holds guards of two maps at once, so no lock-order deadlock.
        let Some((_, family_record)) = self.families.remove(&family) else {
            return;
        };
        for member in family_record.members {
            self.tokens.remove(&member);
        }
        if let Some(user) = family_record.username {
            if let Some(mut list) = self.user_families.get_mut(&user) {
                list.retain(|f| *f != family);
            }
        }
    }

    /// Revokes one token as RFC 7009 asks: a refresh token takes its whole family with
    /// it; an access token goes alone. Only a token of `client_id` is touched; returns
    /// whether one was revoked.
    pub fn revoke(&self, token: &str, client_id: &str) -> bool {
        let key = digest(token);
        let (is_refresh, family) = match self.tokens.get(&key).as_deref() {
            Some(Record::Refresh { grant, family, .. }) if &*grant.client_id == client_id => {
                (true, *family)
            }
            Some(Record::Access { identity, family }) if &*identity.client_id == client_id => {
                (false, *family)
            }
            _ => return false,
        };
        if is_refresh {
            self.revoke_family(family);
        } else {
            self.tokens.remove(&key);
        }
        true
    }

    /// Revokes an access token and everything issued with it (its family): Covata's
    /// `/api/v1/auth/token/revoke`.
    pub fn revoke_with_family(&self, token: &str) -> bool {
        let family = self.tokens.get(&digest(token)).map(|r| r.family());
        family.inspect(|f| self.revoke_family(*f)).is_some()
    }

    /// Revokes every token of a user; returns how many grants (families) went.
    pub fn revoke_user(&self, username: &str) -> usize {
        let families = self
            .user_families
            .remove(username)
            .map(|(_, list)| list)
            .unwrap_or_default();
        let count = families.len();
        for family in families {
            self.revoke_family(family);
        }
        count
    }

    /// What RFC 7662 introspection may say about a live token.
    pub fn introspect(&self, token: &str) -> Option<Introspection> {
        let now = now_millis();
        match self.tokens.get(&digest(token)).as_deref()? {
            Record::Access { identity, .. } if identity.expires_at > now => Some(Introspection {
                access: true,
                username: identity.username.clone(),
                client_id: identity.client_id.clone(),
                scope: identity.scope().to_owned(),
                jti: identity.jti,
                issued_at: identity.issued_at,
                expires_at: identity.expires_at,
                roles: identity.roles.iter().map(|r| r.to_string()).collect(),
            }),
            Record::Refresh {
                grant,
                jti,
                issued_at,
                expires_at,
                used_at: None,
                ..
            } if *expires_at > now => Some(Introspection {
                access: false,
                username: grant.username.clone(),
                client_id: grant.client_id.clone(),
                scope: grant.scope.to_string(),
                jti: *jti,
                issued_at: *issued_at,
                expires_at: *expires_at,
                roles: Vec::new(),
            }),
            _ => None,
        }
    }

    /// Drops expired records and families; returns how many records went.
    pub fn sweep(&self) -> usize {
        let now = now_millis();
        let before = self.tokens.len();
        self.tokens.retain(|_, record| record.expires_at() > now);
        self.families.retain(|_, family| family.expires_at > now);
        // user_families before families, never the other way round (see revoke_family).
        self.user_families.retain(|_, list| {
            list.retain(|f| self.families.contains_key(f));
            !list.is_empty()
        });
        before.saturating_sub(self.tokens.len())
    }
}

/// One record of a snapshot file: everything but the token itself.
#[derive(Serialize, Deserialize)]
struct SnapshotRecord {
    /// SHA-256 of the token, hex.
    digest: String,
    refresh: bool,
    family: Uuid,
    jti: Uuid,
    username: Option<String>,
    client_id: String,
    #[serde(default)]
    roles: Vec<String>,
    scope: String,
    issued_at: u64,
    expires_at: u64,
    #[serde(default)]
    used_at: Option<u64>,
}

const SNAPSHOT_HEADER: &str = "covata-gateway token snapshot v1";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<TokenDigest> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl TokenStore {
    /// Writes the live records to `path` atomically: a temporary file beside it, synced,
    /// then renamed over it, then the folder synced. Only digests are written, never a
    /// token. Returns how many records were written.
    pub fn write_snapshot(&self, path: &Path) -> std::io::Result<usize> {
        let now = now_millis();
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp)?;
        let mut out = std::io::BufWriter::new(file);
        writeln!(out, "{SNAPSHOT_HEADER}")?;
        let mut written = 0;
        for entry in self.tokens.iter() {
            if entry.expires_at() <= now {
                continue;
            }
            let record = match entry.value() {
                Record::Access { family, identity } => SnapshotRecord {
                    digest: hex(entry.key()),
                    refresh: false,
                    family: *family,
                    jti: identity.jti,
                    username: identity.username.as_deref().map(str::to_owned),
                    client_id: identity.client_id.to_string(),
                    roles: identity.roles.iter().map(|r| r.to_string()).collect(),
                    scope: identity.scope().to_owned(),
                    issued_at: identity.issued_at,
                    expires_at: identity.expires_at,
                    used_at: None,
                },
                Record::Refresh {
                    family,
                    grant,
                    jti,
                    issued_at,
                    expires_at,
                    used_at,
                } => SnapshotRecord {
                    digest: hex(entry.key()),
                    refresh: true,
                    family: *family,
                    jti: *jti,
                    username: grant.username.as_deref().map(str::to_owned),
                    client_id: grant.client_id.to_string(),
                    roles: Vec::new(),
                    scope: grant.scope.to_string(),
                    issued_at: *issued_at,
                    expires_at: *expires_at,
                    used_at: *used_at,
                },
            };
            serde_json::to_writer(&mut out, &record)?;
            out.write_all(b"\n")?;
            written += 1;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename is durable only once the folder's entry is on disk.
            if let Ok(dir) = std::fs::File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(written)
    }

    /// Loads a snapshot written by [`TokenStore::write_snapshot`], dropping expired
    /// records. Returns how many were loaded; a file that does not parse is an error and
    /// nothing of it is loaded.
    pub fn load_snapshot(&self, path: &Path) -> Result<usize, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let mut lines = text.lines();
        if lines.next() != Some(SNAPSHOT_HEADER) {
            return Err("not a covata-gateway token snapshot (bad header)".into());
        }
        let mut records = Vec::new();
        for (n, line) in lines.enumerate() {
            let record: SnapshotRecord =
                serde_json::from_str(line).map_err(|e| format!("record {}: {e}", n + 1))?;
            let digest =
                unhex(&record.digest).ok_or_else(|| format!("record {}: bad digest", n + 1))?;
            records.push((digest, record));
        }
        let now = now_millis();
        let mut loaded = 0;
        let mut user_families: Vec<(u64, Arc<str>, Uuid)> = Vec::new();
        for (digest, r) in records.into_iter().filter(|(_, r)| r.expires_at > now) {
            let username = r.username.as_deref().map(|u| self.interned.text(u).0);
            let client_id = self.interned.text(&r.client_id).0;
            let record = if r.refresh {
                Record::Refresh {
                    family: r.family,
                    grant: Arc::new(Grant {
                        username: username.clone(),
                        client_id,
                        scope: r.scope.into(),
                    }),
                    jti: r.jti,
                    issued_at: r.issued_at,
                    expires_at: r.expires_at,
                    used_at: r.used_at,
                }
            } else {
                let identity = Identity::new(
                    &self.interned,
                    r.username.as_deref(),
                    &client_id,
                    &r.roles,
                    &r.scope,
                    r.jti,
                    (r.issued_at, r.expires_at),
                );
                Record::Access {
                    family: r.family,
                    identity: Arc::new(identity),
                }
            };
            if !self.families.contains_key(&r.family) {
                if let Some(user) = &username {
                    user_families.push((r.issued_at, user.clone(), r.family));
                }
            }
            self.add_to_family(r.family, vec![digest], r.expires_at, username);
            self.tokens.insert(digest, record);
            loaded += 1;
        }
        // Oldest grants first, as they were issued.
        user_families.sort_by_key(|(issued, _, _)| *issued);
        for (_, user, family) in user_families {
            self.user_families
                .entry(user)
                .or_default()
                .push_back(family);
        }
        Ok(loaded)
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

    #[test]
    fn grace_period_lets_a_lost_response_be_retried() {
        let store = TokenStore::default();
        store.set_limits(
            usize::MAX,
            usize::MAX,
            std::time::Duration::from_millis(300),
        );
        let refresh = issue(&store, None, 60).refresh_token.unwrap();
        assert!(store.redeem_refresh(&refresh, "app", |_| Ok(())).is_ok());
        assert!(
            store.redeem_refresh(&refresh, "app", |_| Ok(())).is_ok(),
            "within grace"
        );
        std::thread::sleep(std::time::Duration::from_millis(350));
        assert_eq!(
            store
                .redeem_refresh(&refresh, "app", |_| Ok(()))
                .unwrap_err(),
            RefreshError::Replayed
        );
    }

    #[test]
    fn rfc7009_revocation_by_kind_and_client() {
        let store = TokenStore::default();
        let a = issue(&store, None, 60);
        assert!(
            !store.revoke(&a.access_token, "other"),
            "another client's token is untouched"
        );
        assert!(store.authenticate(&a.access_token).is_some());
        assert!(store.revoke(&a.access_token, "app"));
        assert!(store.authenticate(&a.access_token).is_none());
        assert!(
            store
                .introspect(a.refresh_token.as_ref().unwrap())
                .is_some(),
            "access alone went"
        );
        let b = issue(&store, None, 60);
        assert!(store.revoke(b.refresh_token.as_ref().unwrap(), "app"));
        assert!(
            store.authenticate(&b.access_token).is_none(),
            "a refresh token takes its family"
        );
        assert!(!store.revoke("unknown", "app"));
    }

    #[test]
    fn user_expiry_and_per_user_cap() {
        let store = TokenStore::default();
        store.set_limits(usize::MAX, 2, std::time::Duration::ZERO);
        let first = issue(&store, None, 60);
        let second = issue(&store, None, 60);
        let third = issue(&store, None, 60);
        assert!(
            store.authenticate(&first.access_token).is_none(),
            "oldest grant evicted"
        );
        assert!(store.authenticate(&second.access_token).is_some());
        // A refresh stays in its family and does not count as a new grant.
        let (_, family) = store
            .redeem_refresh(third.refresh_token.as_ref().unwrap(), "app", |_| Ok(()))
            .unwrap();
        let rotated = issue(&store, Some(family), 60);
        assert!(store.authenticate(&second.access_token).is_some());
        assert_eq!(store.revoke_user("alex"), 2);
        for token in [
            &second.access_token,
            &third.access_token,
            &rotated.access_token,
        ] {
            assert!(store.authenticate(token).is_none());
        }
        assert_eq!(store.revoke_user("alex"), 0);
    }

    fn issue_access_only(store: &TokenStore) {
        store
            .issue(IssueRequest {
                family: None,
                username: None,
                client_id: "app".into(),
                roles: &[],
                scope: String::new(),
                grant_scope: String::new(),
                access_ttl: 60,
                refresh_ttl: None,
            })
            .unwrap();
    }

    #[test]
    fn a_full_table_refuses_to_issue() {
        let store = TokenStore::default();
        store.set_limits(5, usize::MAX, std::time::Duration::ZERO);
        issue(&store, None, 60);
        issue(&store, None, 60);
        assert!(!store.is_full() && store.has_room(1) && !store.has_room(2));
        // A grant with a refresh token needs two records: it does not fit in one.
        let squeezed = store.issue(IssueRequest {
            family: None,
            username: Some("alex".into()),
            client_id: "app".into(),
            roles: &[],
            scope: String::new(),
            grant_scope: String::new(),
            access_ttl: 60,
            refresh_ttl: Some(60),
        });
        assert_eq!(squeezed.unwrap_err().code(), "temporarily_unavailable");
        assert_eq!(store.len(), 4);
        issue_access_only(&store);
        assert!(store.is_full());
        let refused = store.issue(IssueRequest {
            family: None,
            username: None,
            client_id: "app".into(),
            roles: &[],
            scope: String::new(),
            grant_scope: String::new(),
            access_ttl: 60,
            refresh_ttl: None,
        });
        assert_eq!(refused.unwrap_err().code(), "temporarily_unavailable");
    }

    #[test]
    fn introspection_reports_live_tokens_only() {
        let store = TokenStore::default();
        let live = issue(&store, None, 60);
        let seen = store.introspect(&live.access_token).unwrap();
        assert!(seen.access);
        assert_eq!(seen.jti, live.jti);
        assert_eq!(seen.roles, vec!["ROLE_A", "ROLE_B"]);
        let refresh = store
            .introspect(live.refresh_token.as_ref().unwrap())
            .unwrap();
        assert!(!refresh.access);
        assert_eq!(refresh.scope, "read write");
        let expired = issue(&store, None, 0);
        assert!(store.introspect(&expired.access_token).is_none());
        assert!(store.introspect("unknown").is_none());
    }

    #[test]
    fn snapshot_round_trip_keeps_tokens_and_holds_no_token_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.snapshot");
        let store = TokenStore::default();
        let a = issue(&store, None, 60);
        let b = issue(&store, None, 60);
        let expired = issue(&store, None, 0);
        let (_, family) = store
            .redeem_refresh(b.refresh_token.as_ref().unwrap(), "app", |_| Ok(()))
            .unwrap();
        let _ = family;
        assert_eq!(
            store.write_snapshot(&path).unwrap(),
            5,
            "the expired access token is left out"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        for token in [
            &a.access_token,
            a.refresh_token.as_ref().unwrap(),
            &b.access_token,
        ] {
            assert!(!text.contains(token.as_str()), "no token text on disk");
        }

        let restored = TokenStore::default();
        assert_eq!(restored.load_snapshot(&path).unwrap(), 5);
        let identity = restored.authenticate(&a.access_token).unwrap();
        assert_eq!(identity.roles_header, "ROLE_A,ROLE_B");
        assert!(restored.authenticate(&expired.access_token).is_none());
        assert!(restored
            .redeem_refresh(a.refresh_token.as_ref().unwrap(), "app", |_| Ok(()))
            .is_ok());
        // b's refresh token was used before the snapshot: presenting it again is a replay.
        assert_eq!(
            restored
                .redeem_refresh(b.refresh_token.as_ref().unwrap(), "app", |_| Ok(()))
                .unwrap_err(),
            RefreshError::Replayed
        );
        assert!(restored.authenticate(&b.access_token).is_none());
        // a's grant and the grant whose access token expired (its refresh token lives).
        assert_eq!(restored.revoke_user("alex"), 2, "the user index is rebuilt");
    }

    #[test]
    fn corrupt_snapshots_are_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.snapshot");
        for bad in [
            "garbage",
            "covata-gateway token snapshot v1\n{not json",
            "covata-gateway token snapshot v1\n{\"digest\":\"zz\"}",
        ] {
            std::fs::write(&path, bad).unwrap();
            let store = TokenStore::default();
            assert!(store.load_snapshot(&path).is_err(), "{bad}");
            assert!(store.is_empty());
        }
    }
}
