//! Measures what identity costs: argon2id hashing, and the latency that authentication
//! plus rate limiting add to every request, against the real PostgreSQL and Redis.
//! Run with `scripts/bench/auth` (release build). Prints figures; asserts nothing.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::json;
use spool_api::auth::{AuthOutcome, Scope, TokenVerifier};
use spool_api::identity::authn::Authenticator;
use spool_api::identity::middleware;
use spool_api::identity::passwords::{self, NewPassword};
use spool_api::ratelimit::RateLimiter;
use spool_api::redis_handle::RedisHandle;
use spool_tests::{AppOptions, spawn_app_with};

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64 * 1000.0;
    (at(0.5), at(0.99), mean)
}

/// Verify, then read the token's cached standing with its own Redis command: what
/// authentication cost before the standing came with the rate limit (`middleware::admit`).
async fn cached_outcome(authenticator: &Authenticator, redis: &RedisHandle, token: &str) {
    let verified = authenticator.verify(token).unwrap();
    let key = authenticator.standing_key(&verified);
    let standing: Option<String> = redis.query(redis::cmd("GET").arg(&key)).await.unwrap();
    let outcome = authenticator.from_cached(verified, &standing.expect("cached by the API's first request"));
    assert!(matches!(outcome, Some(AuthOutcome::Authenticated(_))));
}

#[tokio::main]
async fn main() {
    let requests: usize = std::env::var("BENCH_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let mut app = spawn_app_with(AppOptions { worker_models: vec![], ..Default::default() }).await;
    // The bench measures the path, not the quota: give the token a quota it cannot hit.
    let mut settings = app.settings.clone();
    settings.rate_limit.user = spool_shared::config::Quota { per_minute: 10_000_000, burst: 1_000_000 };
    app.restart_api(settings.clone()).await;

    // 1. argon2id, OWASP parameters (m=19 MiB, t=2, p=1), on the blocking pool as in the API.
    let mut hashes = Vec::new();
    for _ in 0..20 {
        let password = NewPassword::parse("violet-lantern-harbor".into()).unwrap();
        let started = Instant::now();
        passwords::hash(password).await.unwrap();
        hashes.push(started.elapsed());
    }
    let (p50, p99, mean) = percentiles(hashes);
    println!("argon2id hash (m=19456 KiB, t=2, p=1): p50 {p50:.1} ms, p99 {p99:.1} ms, mean {mean:.1} ms (20 runs)");

    // 2. The middleware's work per request, in-process: verify the PASETO signature and
    //    claims, check revocation (Redis cache; PostgreSQL on a miss), take a GCRA token.
    let redis = RedisHandle::new(
        redis::Client::open(secrecy::ExposeSecret::expose_secret(&settings.redis_url)).unwrap(),
        &settings.redis_prefix,
    );
    let verifier = TokenVerifier::new(&settings.auth.public_keys, "spool").unwrap();
    let db = spool_shared::db::connect(&settings).await.unwrap();
    let authenticator = Authenticator::new(verifier.clone(), db, redis.clone(), Duration::from_secs(30));
    let limiter = RateLimiter::new(redis.clone());
    let (user_id, token) = app.new_user_with_token(&[Scope::JobsRead, Scope::JobsWrite]).await;
    // The first request asks PostgreSQL and caches the token's standing; the runs time the rest.
    middleware::admit(&authenticator, &limiter, &settings.rate_limit, &token).await;
    let _ = user_id;
    let quota = settings.rate_limit.user;
    let (mut verify_first, mut verify_again) = (Vec::new(), Vec::new());
    let (mut auth_only, mut auth_then_limit, mut admit) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..requests {
        // A verifier that has not seen the token: the Ed25519 check and the claims.
        let fresh = TokenVerifier::new(&settings.auth.public_keys, "spool").unwrap();
        let started = Instant::now();
        fresh.verify(&token).unwrap();
        verify_first.push(started.elapsed());
        let started = Instant::now();
        verifier.verify(&token).unwrap();
        verify_again.push(started.elapsed());
        let started = Instant::now();
        cached_outcome(&authenticator, &redis, &token).await;
        auth_only.push(started.elapsed());
        // The baseline: the cached standing and the rate limit one after the other.
        let started = Instant::now();
        cached_outcome(&authenticator, &redis, &token).await;
        limiter.check("bench", quota).await.unwrap();
        auth_then_limit.push(started.elapsed());
        // What the middleware does: both in one round trip.
        let started = Instant::now();
        let (_, decision) = middleware::admit(&authenticator, &limiter, &settings.rate_limit, &token).await;
        decision.expect("the standing is cached, so the gate took a cell");
        admit.push(started.elapsed());
    }
    let mean_ms = |samples: &[Duration]| percentiles(samples.to_vec()).2;
    let one_trip_ratio = mean_ms(&admit) / mean_ms(&auth_then_limit);
    for (name, samples) in [
        ("PASETO verify, token not seen before (signature + claims)", verify_first),
        ("PASETO verify, token seen before (remembered by SHA-256)", verify_again),
        ("authenticate (verify + revocation check)", auth_only),
        ("authenticate, then rate limit (two Redis round trips)", auth_then_limit),
        ("admit: authenticate + rate limit in one round trip (what every request pays)", admit),
    ] {
        let (p50, p99, mean) = percentiles(samples);
        println!("{name}: p50 {p50:.3} ms, p99 {p99:.3} ms, mean {mean:.3} ms ({requests} runs)");
    }
    println!("one round trip / two, mean: {one_trip_ratio:.2}");

    // 3. For scale: POST /v1/jobs as a client sees it (one connection, sequential).
    let body = json!({"model": "digits-cnn", "input": {"pixels": vec![0; 64]}});
    let (mut submit, mut health) = (Vec::new(), Vec::new());
    for _ in 0..requests {
        let started = Instant::now();
        let response = app.client.post(app.url("/v1/jobs")).bearer_auth(&token).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 202);
        response.bytes().await.unwrap();
        submit.push(started.elapsed());
        let started = Instant::now();
        app.client.get(app.url("/healthz")).send().await.unwrap().bytes().await.unwrap();
        health.push(started.elapsed());
    }
    let (s50, s99, _) = percentiles(submit);
    let (h50, h99, _) = percentiles(health);
    println!("POST /v1/jobs end to end: p50 {s50:.3} ms, p99 {s99:.3} ms ({requests} sequential requests)");
    println!("GET /healthz (no auth, no database) baseline: p50 {h50:.3} ms, p99 {h99:.3} ms");
}
