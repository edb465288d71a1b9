//! Code shared by the API, the worker and the tests: configuration, domain types,
//! database entities, the AMQP topology and message envelope, the model manifest
//! and telemetry.

pub mod amqp;
pub mod breaker;
pub mod config;
pub mod db;
pub mod entities;
pub mod job;
pub mod manifest;
pub mod retry;
pub mod sealing;
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
