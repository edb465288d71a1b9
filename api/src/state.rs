//! What every handler can reach.

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use spool_shared::Settings;
use spool_shared::sealing::SecretSealer;

use crate::auth::TokenSigner;
use crate::catalog::ModelCatalog;
use crate::completions::CompletionWaiters;
use crate::identity::authn::Authenticator;
use crate::identity::mailer::Mailer;
use crate::job_inserter::JobInserter;
use crate::publisher::Publisher;
use crate::ratelimit::RateLimiter;
use crate::redis_handle::RedisHandle;
use crate::workers::WorkerRegistry;

#[derive(Clone)]
pub struct AppState {
    pub db: DatabaseConnection,
    pub catalog: ModelCatalog,
    pub inserter: JobInserter,
    pub publisher: Publisher,
    pub waiters: CompletionWaiters,
    pub redis: RedisHandle,
    pub authenticator: Authenticator,
    pub limiter: RateLimiter,
    pub signer: TokenSigner,
    pub mailer: Mailer,
    pub workers: WorkerRegistry,
    /// Seals webhook signing secrets before they are stored.
    pub sealer: SecretSealer,
    pub settings: Arc<Settings>,
}
