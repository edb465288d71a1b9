//! A Redis connection that tolerates Redis being down.
//!
//! Redis holds caches and rate-limit state only, so every caller has a fallback: the
//! revocation check asks PostgreSQL, the rate limiter lets requests through. Commands
//! get a short timeout so a hung Redis cannot stall requests, and reconnection is
//! attempted at most once a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

const COMMAND_TIMEOUT: Duration = Duration::from_millis(250);
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RedisUnavailable {
    #[error("redis: {0}")]
    Command(#[from] redis::RedisError),
    #[error("redis: no answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: not connected")]
    NotConnected,
}

#[derive(Clone)]
pub struct RedisHandle {
    client: redis::Client,
    prefix: Arc<str>,
    state: Arc<Mutex<State>>,
}

struct State {
    connection: Option<ConnectionManager>,
    last_attempt: Option<Instant>,
}

impl RedisHandle {
    pub fn new(client: redis::Client, prefix: &str) -> Self {
        Self {
            client,
            prefix: prefix.into(),
            state: Arc::new(Mutex::new(State { connection: None, last_attempt: None })),
        }
    }

    /// The full name of a key: `<prefix>:<name>`.
    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    async fn connection(&self) -> Result<ConnectionManager, RedisUnavailable> {
        let mut state = self.state.lock().await;
        if let Some(connection) = &state.connection {
            return Ok(connection.clone());
        }
        if state.last_attempt.is_some_and(|at| at.elapsed() < RECONNECT_EVERY) {
            return Err(RedisUnavailable::NotConnected);
        }
        state.last_attempt = Some(Instant::now());
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1);
        let connection =
            tokio::time::timeout(COMMAND_TIMEOUT * 2, ConnectionManager::new_with_config(self.client.clone(), config))
                .await
                .map_err(|_| RedisUnavailable::Timeout(COMMAND_TIMEOUT * 2))??;
        state.connection = Some(connection.clone());
        Ok(connection)
    }

    /// Runs one command or script invocation with a timeout.
    pub async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, RedisUnavailable> {
        let mut connection = self.connection().await?;
        tokio::time::timeout(COMMAND_TIMEOUT, command.query_async(&mut connection))
            .await
            .map_err(|_| RedisUnavailable::Timeout(COMMAND_TIMEOUT))?
            .map_err(RedisUnavailable::from)
    }

    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[impl redis::ToRedisArgs],
    ) -> Result<T, RedisUnavailable> {
        let mut connection = self.connection().await?;
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        tokio::time::timeout(COMMAND_TIMEOUT, invocation.invoke_async(&mut connection))
            .await
            .map_err(|_| RedisUnavailable::Timeout(COMMAND_TIMEOUT))?
            .map_err(RedisUnavailable::from)
    }

    pub async fn ping(&self) -> bool {
        self.query::<String>(&redis::cmd("PING")).await.is_ok()
    }
}
