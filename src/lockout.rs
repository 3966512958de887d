//! Brute-force protection for sign-in: after `max_failed_logins` failures for a username,
//! or from one client IP, within `lockout_window`, further attempts fail at once, even
//! with the right password, until the window has passed.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
}

/// Failure counters per username and per client IP.
#[derive(Debug, Default)]
pub struct Lockout {
    by_user: DashMap<String, Failures>,
    by_ip: DashMap<IpAddr, Failures>,
}

fn locked(entry: Option<Failures>, max: u32, window: Duration, now: Instant) -> bool {
    entry.is_some_and(|f| f.count >= max && now.duration_since(f.since) < window)
}

fn bump(entry: &mut Failures, window: Duration, now: Instant) {
    if now.duration_since(entry.since) >= window {
        *entry = Failures {
            count: 0,
            since: now,
        };
    }
    entry.count = entry.count.saturating_add(1);
}

impl Lockout {
    /// Whether attempts for this username or from this IP are locked out now.
    pub fn is_locked(&self, username: &str, ip: IpAddr, max: u32, window: Duration) -> bool {
        let now = Instant::now();
        // Copy the counters out so no guard outlives this expression.
        let user = self.by_user.get(username).map(|f| *f);
        let ip = self.by_ip.get(&ip).map(|f| *f);
        locked(user, max, window, now) || locked(ip, max, window, now)
    }

    /// Counts a failed attempt.
    pub fn fail(&self, username: &str, ip: IpAddr, window: Duration) {
        let now = Instant::now();
        let fresh = Failures {
            count: 0,
            since: now,
        };
        bump(
            &mut self.by_user.entry(username.to_owned()).or_insert(fresh),
            window,
            now,
        );
        bump(&mut self.by_ip.entry(ip).or_insert(fresh), window, now);
    }

    /// A successful sign-in clears the username's counter (not the IP's: one good
    /// account must not reset a spray across many).
    pub fn succeed(&self, username: &str) {
        self.by_user.remove(username);
    }

    /// Forgets counters whose window has passed.
    pub fn sweep(&self, window: Duration) {
        let now = Instant::now();
        self.by_user
            .retain(|_, f| now.duration_since(f.since) < window);
        self.by_ip
            .retain(|_, f| now.duration_since(f.since) < window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_and_lifts_after_window() {
        let lockout = Lockout::default();
        let ip: IpAddr = [127, 0, 0, 1].into();
        let window = Duration::from_millis(200);
        for _ in 0..3 {
            assert!(!lockout.is_locked("a", ip, 3, window));
            lockout.fail("a", ip, window);
        }
        assert!(lockout.is_locked("a", ip, 3, window));
        // The IP is locked too, whatever the username.
        assert!(lockout.is_locked("b", ip, 3, window));
        assert!(!lockout.is_locked("b", [10, 0, 0, 1].into(), 3, window));
        std::thread::sleep(window);
        assert!(!lockout.is_locked("a", ip, 3, window));
        lockout.sweep(window);
        assert!(lockout.by_user.is_empty() && lockout.by_ip.is_empty());
    }

    #[test]
    fn success_resets_the_user_only() {
        let lockout = Lockout::default();
        let ip: IpAddr = [127, 0, 0, 1].into();
        let window = Duration::from_secs(60);
        lockout.fail("a", ip, window);
        lockout.fail("a", ip, window);
        lockout.succeed("a");
        assert!(!lockout.is_locked("a", [10, 0, 0, 2].into(), 2, window));
        assert!(lockout.is_locked("a", ip, 2, window));
    }
}
