//! Passwords and client secrets: argon2id PHC strings, verified on tokio's blocking
//! pool so a sign-in never stalls the async workers, plus a cache that spares a busy
//! client an argon2 run per request.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Cheap argon2id parameters for tests only: 8 MiB memory, one pass.
pub const TEST_PARAMS: (u32, u32, u32) = (8 * 1024, 1, 1);

/// Checks that a string is an argon2id PHC string with parameters argon2 accepts.
pub fn check_phc(text: &str) -> Result<(), String> {
    let hint = "expected an argon2id PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash); make one with `covata-gateway hash-password`";
    let hash = PasswordHash::new(text).map_err(|e| format!("not a PHC string ({e}); {hint}"))?;
    if hash.algorithm != argon2::ARGON2ID_IDENT {
        return Err(format!(
            "algorithm `{}` is not argon2id; {hint}",
            hash.algorithm
        ));
    }
    Params::try_from(&hash).map_err(|e| format!("bad argon2 parameters ({e}); {hint}"))?;
    if hash.hash.is_none() {
        return Err(format!("the PHC string has no hash part; {hint}"));
    }
    Ok(())
}

/// Hashes a password with argon2id's recommended default parameters (RFC 9106 second
/// recommendation as adopted by the argon2 crate: m=19 MiB, t=2, p=1).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    hash_with(Argon2::default(), password)
}

/// Hashes with explicit (memory KiB, passes, lanes); for tests and matching parameters.
pub fn hash_password_with(
    password: &str,
    (m, t, p): (u32, u32, u32),
) -> Result<String, argon2::password_hash::Error> {
    let params = Params::new(m, t, p, None)?;
    hash_with(
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params),
        password,
    )
}

fn hash_with(argon2: Argon2<'_>, password: &str) -> Result<String, argon2::password_hash::Error> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|_| argon2::password_hash::Error::Crypto)?;
    let salt = SaltString::encode_b64(&salt)?;
    Ok(argon2
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Runs argon2 verifications on the blocking pool, as many at once as there are cores:
/// more would only add memory (19 MiB each) and latency, and a flood of sign-ins must
/// not grow the blocking pool to hundreds of threads.
pub struct Verifier {
    permits: Arc<tokio::sync::Semaphore>,
}

impl Default for Verifier {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Verifier {
            permits: Arc::new(tokio::sync::Semaphore::new(cores)),
        }
    }
}

impl Verifier {
    /// Verifies a password against a PHC string off the async workers. A hash that fails
    /// to parse (impossible after config validation) counts as a mismatch.
    pub async fn verify(
        &self,
        phc: Arc<str>,
        password: String,
    ) -> Result<bool, crate::error::Error> {
        let internal = || crate::error::Error::Internal("password verification failed".into());
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| internal())?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            PasswordHash::new(&phc)
                .map(|hash| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &hash)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .map_err(|_| internal())
    }
}

/// A PHC string with the same parameters as `like`, for a password nobody knows: checking
/// it costs what checking a real user's password costs, so an unknown username cannot be
/// told from a wrong password by timing.
pub fn decoy_hash(like: Option<&str>) -> String {
    let params = like
        .and_then(|l| PasswordHash::new(l).ok())
        .and_then(|h| Params::try_from(&h).ok())
        .map(|p| (p.m_cost(), p.t_cost(), p.p_cost()))
        .unwrap_or((
            Params::DEFAULT_M_COST,
            Params::DEFAULT_T_COST,
            Params::DEFAULT_P_COST,
        ));
    let mut secret = [0u8; 32];
    // With no randomness the decoy is still a valid hash of a fixed string that no
    // client can send: it is only verified after the lookup has already failed.
    let _ = getrandom::getrandom(&mut secret);
    let password = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, secret);
    hash_password_with(&password, params)
        .or_else(|_| hash_password(&password))
        .unwrap_or_default()
}

/// Client secrets that verified once, remembered as a keyed SHA-256 digest of the
/// presented secret (never the secret), so a busy client does not pay argon2 per
/// request. Cleared on reload, so a changed secret takes effect at once.
pub struct SecretCache {
    key: [u8; 32],
    verified: DashMap<Arc<str>, [u8; 32]>,
}

impl Default for SecretCache {
    fn default() -> Self {
        let mut key = [0u8; 32];
        let _ = getrandom::getrandom(&mut key);
        SecretCache {
            key,
            verified: DashMap::new(),
        }
    }
}

impl SecretCache {
    fn digest(&self, client_id: &str, secret: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.key);
        hasher.update((client_id.len() as u64).to_be_bytes());
        hasher.update(client_id.as_bytes());
        hasher.update(secret.as_bytes());
        hasher.finalize().into()
    }

    /// Whether this exact secret verified before for this client (constant-time compare).
    pub fn contains(&self, client_id: &str, secret: &str) -> bool {
        let presented = self.digest(client_id, secret);
        self.verified
            .get(client_id)
            .is_some_and(|known| bool::from(known.ct_eq(&presented)))
    }

    /// Remembers a secret that just verified.
    pub fn remember(&self, client_id: &Arc<str>, secret: &str) {
        let digest = self.digest(client_id, secret);
        self.verified.insert(client_id.clone(), digest);
    }

    /// Forgets everything (on reload).
    pub fn clear(&self) {
        self.verified.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_then_verify() {
        let phc: Arc<str> = hash_password_with("s3cret", TEST_PARAMS).unwrap().into();
        check_phc(&phc).unwrap();
        let verifier = Verifier::default();
        assert!(verifier.verify(phc.clone(), "s3cret".into()).await.unwrap());
        assert!(!verifier.verify(phc, "s3cret ".into()).await.unwrap());
    }

    #[test]
    fn phc_checks() {
        assert!(check_phc("hunter2").is_err());
        assert!(
            check_phc("$argon2i$v=19$m=8192,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA")
                .unwrap_err()
                .contains("not argon2id")
        );
        assert!(check_phc(&hash_password("x").unwrap()).is_ok());
    }

    #[test]
    fn decoy_matches_the_parameters_it_imitates() {
        let real = hash_password_with("pw", (9 * 1024, 2, 1)).unwrap();
        let decoy = decoy_hash(Some(&real));
        assert!(
            decoy.starts_with("$argon2id$v=19$m=9216,t=2,p=1$"),
            "{decoy}"
        );
        assert!(decoy_hash(None).starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[test]
    fn cache_remembers_only_the_exact_secret_for_the_exact_client() {
        let cache = SecretCache::default();
        let id: Arc<str> = "app".into();
        assert!(!cache.contains("app", "secret"));
        cache.remember(&id, "secret");
        assert!(cache.contains("app", "secret"));
        assert!(!cache.contains("app", "secreT"));
        assert!(!cache.contains("app2", "secret"));
        cache.clear();
        assert!(!cache.contains("app", "secret"));
    }
}
