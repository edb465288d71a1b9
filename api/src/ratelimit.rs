//! Request quotas with GCRA (generic cell rate algorithm), kept in Redis and updated
//! atomically by one Lua script, so every API instance shares the same budget.
//!
//! When Redis is unreachable the limiter fails open: the request goes through, a
//! warning is logged and `spool_ratelimit_unavailable_total` counts it. Losing rate
//! limiting for a while is better than refusing every client.

use spool_shared::config::Quota;
use uuid::Uuid;

use crate::error::ApiError;
use crate::redis_handle::RedisHandle;

/// KEYS[1]: the bucket. ARGV: emission interval (µs), burst, cost (cells taken).
/// Returns {allowed (0/1), remaining, reset_us, retry_after_us}. Uses the server's
/// clock, so instances with skewed clocks still agree.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local limit_window = interval * burst
local new_tat = tat + interval * cost
if new_tat - now > limit_window then
  local retry_after = new_tat - now - limit_window
  return {0, 0, tat - now, retry_after}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000))
local remaining = math.floor((limit_window - (new_tat - now)) / interval)
return {1, remaining, new_tat - now, 0}
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

#[derive(Clone)]
pub struct RateLimiter {
    redis: RedisHandle,
    script: std::sync::Arc<redis::Script>,
}

impl RateLimiter {
    pub fn new(redis: RedisHandle) -> Self {
        Self { redis, script: std::sync::Arc::new(redis::Script::new(GCRA)) }
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

    async fn take(&self, bucket: &str, quota: Quota, cost: u32) -> Option<Decision> {
        let per_minute = quota.per_minute.max(1) as i64;
        let interval_us = 60_000_000 / per_minute;
        let key = self.redis.key(&format!("ratelimit:{bucket}"));
        let args = [interval_us, quota.burst.max(1) as i64, i64::from(cost)];
        match self.redis.invoke::<Vec<i64>>(&self.script, &[&key], &args).await {
            Ok(reply) if reply.len() == 4 => Some(Decision {
                allowed: reply[0] == 1,
                limit: quota.burst.max(1),
                remaining: reply[1].max(0) as u32,
                reset_secs: (reply[2].max(0) as u64).div_ceil(1_000_000),
                retry_after_secs: (reply[3].max(0) as u64).div_ceil(1_000_000).max(u64::from(reply[0] == 0)),
            }),
            Ok(reply) => {
                tracing::warn!(?reply, "unexpected rate-limit reply; failing open");
                None
            }
            Err(error) => {
                tracing::warn!(%error, "rate limiter unavailable; failing open");
                metrics::counter!("spool_ratelimit_unavailable_total").increment(1);
                None
            }
        }
    }
}
