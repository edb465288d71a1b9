//! Authenticates the bearer token (once per request) and applies rate limits, adding
//! `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` to the response.
//!
//! Buckets: per API or session token for authenticated requests; per client IP for the
//! unauthenticated `/v1/auth/*` endpoints. The `BearerAuth` security scheme then only
//! reads the outcome stored in the request's extensions.

use std::net::{IpAddr, Ipv6Addr};

use poem::http::HeaderValue;
use poem::web::RemoteAddr;
use poem::{Endpoint, IntoResponse, Request, Response};

use spool_shared::config::RateLimitSettings;

use crate::auth::{AuthOutcome, Role};
use crate::error::{self, ApiError};
use crate::identity::authn::Authenticator;
use crate::ratelimit::{Decision, Gate, RateLimiter};
use crate::state::AppState;

pub async fn authenticate_and_limit<E: Endpoint>(endpoint: E, mut request: Request) -> poem::Result<Response> {
    let Some(state) = request.data::<AppState>().cloned() else {
        return Err(ApiError::Unexpected(anyhow::anyhow!("AppState missing")).into());
    };
    let path = request.uri().path().to_owned();
    let limits = &state.settings.rate_limit;
    let decision = if path.starts_with("/v1/auth/") {
        state.limiter.check(&format!("ip:{}", client_of(request.remote_addr())), limits.auth_per_ip).await
    } else if let Some(token) = bearer(&request) {
        let (outcome, decision) = admit(&state.authenticator, &state.limiter, limits, &token).await;
        request.extensions_mut().insert(outcome);
        decision
    } else {
        None
    };

    let mut response = match decision {
        Some(d) if !d.allowed => {
            metrics::counter!("spool_ratelimit_rejected_total").increment(1);
            poem::error::ResponseError::as_response(&ApiError::RateLimited { retry_after_secs: d.retry_after_secs })
        }
        _ => match endpoint.call(request).await {
            Ok(output) => output.into_response(),
            Err(error) => error::problem_from_poem(error).await,
        },
    };
    if let Some(decision) = decision {
        add_headers(&mut response, decision);
    }
    Ok(response)
}

/// Authenticates a bearer token and takes one request from its quota. When Redis has
/// the token's standing cached (the usual case), both take one round trip.
pub async fn admit(
    authenticator: &Authenticator,
    limiter: &RateLimiter,
    limits: &RateLimitSettings,
    token: &str,
) -> (AuthOutcome, Option<Decision>) {
    let verified = match authenticator.verify(token) {
        Ok(verified) => verified,
        Err(failure) => return (AuthOutcome::Refused(failure), None),
    };
    let bucket = format!("token:{}", verified.token_id);
    let standing_key = authenticator.standing_key(&verified);
    if let Gate::Cached { standing, decision } =
        limiter.gate(&standing_key, &bucket, limits.user, limits.operator).await
        && let Some(outcome) = authenticator.from_cached(verified.clone(), &standing)
    {
        let authenticated = matches!(outcome, AuthOutcome::Authenticated(_));
        return (outcome, decision.filter(|_| authenticated));
    }
    let outcome = authenticator.authenticate_from_database(verified).await;
    let decision = match &outcome {
        AuthOutcome::Authenticated(principal) => {
            let quota = if principal.role == Role::Operator { limits.operator } else { limits.user };
            limiter.check(&bucket, quota).await
        }
        _ => None,
    };
    (outcome, decision)
}

fn bearer(request: &Request) -> Option<String> {
    let value = request.headers().get(poem::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

fn add_headers(response: &mut Response, decision: Decision) {
    let headers = response.headers_mut();
    headers.insert("RateLimit-Limit", HeaderValue::from(decision.limit));
    headers.insert("RateLimit-Remaining", HeaderValue::from(decision.remaining));
    headers.insert("RateLimit-Reset", HeaderValue::from(decision.reset_secs));
}

/// The client an address stands for, as throttling counts it: an IPv4 address, or an
/// IPv6 /64 (one host's whole allocation: counting single addresses would give it
/// 2^64 fresh buckets).
pub fn client_of(remote: &RemoteAddr) -> String {
    match remote.as_socket_addr().map(|a| a.ip()) {
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let prefix = Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1));
            format!("{prefix}/64")
        }
        Some(IpAddr::V6(v6)) => v6.to_canonical().to_string(),
        Some(ip) => ip.to_string(),
        None => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(address: &str) -> String {
        client_of(&RemoteAddr(poem::Addr::SocketAddr(address.parse().expect("socket address"))))
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_an_ipv4_one_its_address() {
        assert_eq!(client("192.0.2.7:4000"), "192.0.2.7");
        assert_eq!(client("[2001:db8:1:2:aaaa::1]:4000"), "2001:db8:1:2::/64");
        assert_eq!(client("[2001:db8:1:2:ffff:ffff:ffff:ffff]:4000"), "2001:db8:1:2::/64");
        assert_ne!(client("[2001:db8:1:3::1]:4000"), "2001:db8:1:2::/64");
        assert_eq!(client("[::ffff:192.0.2.7]:4000"), "192.0.2.7");
    }
}
