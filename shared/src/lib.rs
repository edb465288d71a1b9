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
