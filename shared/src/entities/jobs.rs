//! The `jobs` table: one row per inference job, from submission to its result.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "jobs")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub owner_id: Uuid,
    pub model: String,
    /// One of [`crate::job::JobStatus`]'s names.
    pub status: String,
    pub input: Json,
    pub output: Option<Json>,
    /// A [`crate::job::JobError`] as JSON when the job failed.
    pub error: Option<Json>,
    /// How many times a worker has started the job.
    pub attempts: i32,
    pub idempotency_key: Option<String>,
    /// SHA-256 of the canonical request, to tell a replay from a conflicting reuse of a key.
    pub request_hash: Option<Vec<u8>>,
    pub batch_id: Option<Uuid>,
    pub worker_id: Option<String>,
    pub batch_size: Option<i32>,
    pub queue_ms: Option<f64>,
    pub inference_ms: Option<f64>,
    pub created_at: DateTimeUtc,
    /// Set once the broker confirmed the job's message; `NULL` means the outbox relay
    /// still owes a publish.
    pub published_at: Option<DateTimeUtc>,
    pub started_at: Option<DateTimeUtc>,
    pub completed_at: Option<DateTimeUtc>,
    /// Failed after its last retryable attempt; listed for operators until requeued or purged.
    pub dead_lettered: bool,
    /// One entry per finished attempt (kept across operator requeues).
    pub attempt_log: Json,
    /// Not started by then: failed with `deadline_exceeded`, never run.
    pub start_deadline: Option<DateTimeUtc>,
    /// The `x-request-id` of the request that created the job; it travels in the job's
    /// messages as their trace id.
    pub request_id: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
