//! Code shared by the API, the worker and the tests:
//!
//! - [`config`]: the typed `Settings` tree (defaults → file → environment);
//! - [`db`]: the PostgreSQL pool and `LISTEN` loop; [`entities`]: the sea-orm entities;
//! - [`job`]: job states and the error record of a failed job;
//! - [`manifest`]: the served models, their artifacts, batching and schemas;
//! - [`amqp`]: the RabbitMQ topology, its declaration, and the job message envelope;
//! - [`retry`]: what a failed attempt becomes (retry tier, dead letter, failure);
//! - [`breaker`]: the circuit breaker (the worker's per model and for PostgreSQL, the
//!   dispatcher's per destination); [`heartbeat`]: what workers report of them to the API;
//! - [`webhooks`]: Standard Webhooks signatures, secrets and event names; [`sealing`]:
//!   webhook secrets sealed at rest; [`ssrf`]: the guard on webhook targets;
//! - [`telemetry`]: logging set-up; [`shutdown`]: the signals every service stops on.

pub mod amqp;
pub mod breaker;
pub mod config;
pub mod db;
pub mod entities;
pub mod heartbeat;
pub mod job;
pub mod manifest;
pub mod retry;
pub mod sealing;
pub mod shutdown;
pub mod ssrf;
pub mod telemetry;
pub mod webhooks;

pub use config::Settings;

/// Every Spool binary links this crate, so this is their allocator. Under load glibc's
/// malloc and free took a sixth of the CPU of an in-process API, worker and their clients
/// (tokio tasks allocate on one thread and free on another); with mimalloc the same load
/// ran 10–20% faster (docs/BENCHMARKS.md). Built without transparent huge pages
/// (`no_thp`), which doubled the idle API's resident memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
