//! Request quotas with GCRA (generic cell rate algorithm), kept in Redis and updated
//! atomically by one Lua script, so every API instance shares the same budget.
//!
//! When Redis is unreachable the limiter fails open: the request goes through, a
//! warning is logged and `spool_ratelimit_unavailable_total` counts it. Losing rate
//! limiting for a while is better than refusing every client.

use std::sync::Arc;

use spool_shared::config::Quota;
use uuid::Uuid;

use crate::error::ApiError;
use crate::redis_handle::RedisHandle;

/// GCRA on one bucket: `gcra(key, emission interval (µs), burst, cost (cells taken))`
/// returns {allowed (0/1), remaining, reset_us, retry_after_us}. Uses the server's
/// clock, so instances with skewed clocks still agree.
const GCRA_FUNCTION: &str = r#"
local function gcra(key, interval, burst, cost)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local limit_window = interval * burst
  local new_tat = tat + interval * cost
  if new_tat - now > limit_window then
    return {0, 0, tat - now, new_tat - now - limit_window}
  end
  redis.call('SET', key, new_tat, 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
  return {1, math.floor((limit_window - (new_tat - now)) / interval), new_tat - now, 0}
end
"#;

/// KEYS[1]: the bucket. ARGV: interval, burst, cost.
const TAKE: &str = "return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))";

/// KEYS[1]: the token's cached standing (`Authenticator::standing_key`); KEYS[2]: its
/// bucket. ARGV: interval and burst for users, then for operators. Reads the standing
/// and, unless it is missing or `revoked`, takes one cell with the quota of the role it
/// names (a `|`-separated field). Returns {standing or '', then, if a cell was taken,
/// 1 when the operator quota applied (else 0) and GCRA's four numbers}.
/// One round trip instead of two on every authenticated request.
const GATE: &str = r#"
local standing = redis.call('GET', KEYS[1])
if not standing or standing == 'revoked' then return {standing or ''} end
local operator = 0
if string.find('|' .. standing .. '|', '|operator|', 1, true) then operator = 1 end
local decision = gcra(KEYS[2], tonumber(ARGV[1 + 2 * operator]), tonumber(ARGV[2 + 2 * operator]), 1)
return {standing, operator, decision[1], decision[2], decision[3], decision[4]}
"#;

/// The outcome of one check, for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// Seconds to wait before retrying (denied requests).
    pub retry_after_secs: u64,
}

/// What `RateLimiter::gate` found.
#[derive(Debug)]
pub enum Gate {
    /// The standing was cached: here it is, with the decision when a cell was taken
    /// (not for a revoked token).
    Cached { standing: String, decision: Option<Decision> },
    /// Nothing cached (or Redis down): authenticate the slow way, then `check`.
    NotCached,
}

#[derive(Clone)]
pub struct RateLimiter {
    redis: RedisHandle,
    take: Arc<redis::Script>,
    gate: Arc<redis::Script>,
}

impl RateLimiter {
    pub fn new(redis: RedisHandle) -> Self {
        let script = |body: &str| Arc::new(redis::Script::new(&format!("{GCRA_FUNCTION}\n{body}")));
        Self { redis, take: script(TAKE), gate: script(GATE) }
    }

    /// Reads a token's cached standing and takes one request from its bucket, with the
    /// quota of the role that standing names, in one Redis round trip.
    pub async fn gate(&self, standing_key: &str, bucket: &str, user: Quota, operator: Quota) -> Gate {
        let key = self.bucket_key(bucket);
        let (user_interval, user_burst) = gcra_args(user);
        let (operator_interval, operator_burst) = gcra_args(operator);
        let args = [user_interval, user_burst, operator_interval, operator_burst];
        // Redis down or a reply of another shape: the slow path asks (and counts) again.
        let Ok(reply) = self.redis.invoke::<Vec<redis::Value>>(&self.gate, &[standing_key, &key], &args).await else {
            return Gate::NotCached;
        };
        let Some(Ok(standing)) = reply.first().map(redis::from_redis_value_ref::<String>) else {
            return Gate::NotCached;
        };
        if standing.is_empty() {
            return Gate::NotCached;
        }
        let numbers: Vec<i64> = reply[1..].iter().filter_map(|v| redis::from_redis_value_ref(v).ok()).collect();
        // The script says which quota it applied; `None` when it took no cell (revoked).
        let decision = match numbers.split_first() {
            Some((&applied_operator, gcra_reply)) => {
                decision(if applied_operator == 1 { operator } else { user }, gcra_reply)
            }
            None => None,
        };
        Gate::Cached { decision, standing }
    }

    /// Takes one request from `bucket`'s quota. `None` when Redis is unreachable
    /// (fail open).
    pub async fn check(&self, bucket: &str, quota: Quota) -> Option<Decision> {
        self.take(bucket, quota, 1).await
    }

    /// Takes `count` jobs submitted in batches from the account's quota
    /// (`rate_limit.batch_jobs`): a 429 when the account has used it up. Fails open.
    pub async fn admit_batch_jobs(&self, user_id: Uuid, count: usize, quota: Quota) -> Result<(), ApiError> {
        // A batch larger than the burst could never pass: it takes the whole burst.
        let cost = u32::try_from(count).unwrap_or(u32::MAX).clamp(1, quota.burst.max(1));
        match self.take(&format!("batch-jobs:{user_id}"), quota, cost).await {
            Some(decision) if !decision.allowed => {
                metrics::counter!("spool_ratelimit_rejected_total").increment(1);
                Err(ApiError::RateLimited { retry_after_secs: decision.retry_after_secs })
            }
            _ => Ok(()),
        }
    }

    fn bucket_key(&self, bucket: &str) -> String {
        self.redis.key(&format!("ratelimit:{bucket}"))
    }

    async fn take(&self, bucket: &str, quota: Quota, cost: u32) -> Option<Decision> {
        let (interval, burst) = gcra_args(quota);
        let args = [interval, burst, i64::from(cost)];
        match self.redis.invoke::<Vec<i64>>(&self.take, &[&self.bucket_key(bucket)], &args).await {
            Ok(reply) => {
                let decision = decision(quota, &reply);
                if decision.is_none() {
                    tracing::warn!(?reply, "unexpected rate-limit reply; failing open");
                }
                decision
            }
            Err(error) => {
                tracing::warn!(%error, "rate limiter unavailable; failing open");
                metrics::counter!("spool_ratelimit_unavailable_total").increment(1);
                None
            }
        }
    }
}

/// The script's arguments for a quota: emission interval (µs) and burst. Quotas over
/// 60 million a minute get the shortest interval, 1 µs (0 would make the key's expiry 0,
/// which Redis refuses, and the limiter would fail open on every request).
fn gcra_args(quota: Quota) -> (i64, i64) {
    ((60_000_000 / i64::from(quota.per_minute.max(1))).max(1), i64::from(quota.burst.max(1)))
}

/// GCRA's reply {allowed, remaining, reset_us, retry_after_us} as a decision.
fn decision(quota: Quota, reply: &[i64]) -> Option<Decision> {
    let &[allowed, remaining, reset_us, retry_after_us] = reply else { return None };
    Some(Decision {
        allowed: allowed == 1,
        limit: quota.burst.max(1),
        remaining: remaining.max(0) as u32,
        reset_secs: (reset_us.max(0) as u64).div_ceil(1_000_000),
        retry_after_secs: (retry_after_us.max(0) as u64).div_ceil(1_000_000).max(u64::from(allowed == 0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_quota_has_a_positive_interval() {
        assert_eq!(gcra_args(Quota { per_minute: 6_000, burst: 200 }), (10_000, 200));
        assert_eq!(gcra_args(Quota { per_minute: u32::MAX, burst: 0 }), (1, 1));
        assert_eq!(gcra_args(Quota { per_minute: 0, burst: 5 }), (60_000_000, 5));
    }

    #[test]
    fn replies_of_the_wrong_shape_are_no_decision() {
        let quota = Quota { per_minute: 60, burst: 5 };
        let refused = decision(quota, &[0, 0, 3_000_000, 500_000]).unwrap();
        assert!(!refused.allowed);
        assert_eq!((refused.limit, refused.reset_secs, refused.retry_after_secs), (5, 3, 1));
        assert_eq!(decision(quota, &[1, 2, 3]), None);
    }
}
