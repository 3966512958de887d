//! The raw cost of one argon2id verify with the default parameters (what
//! `hash-password` produces): verifies per second on as many threads as this process
//! may use. The password grant can be no faster; bench/run.sh compares the two.
//!
//! `cargo run --release --example argon2_rate [SECONDS]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let phc: Arc<str> = covata_gateway::credentials::hash_password("bench-password")
        .expect("hash")
        .into();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (phc, done) = (phc.clone(), done.clone());
            std::thread::spawn(move || {
                let hash = PasswordHash::new(&phc).expect("phc");
                while Instant::now() < deadline {
                    assert!(Argon2::default()
                        .verify_password(b"bench-password", &hash)
                        .is_ok());
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    let rate = done.load(Ordering::Relaxed) as f64 / seconds;
    println!("{{\"threads\": {threads}, \"verifies_per_second\": {rate:.1}}}");
}
