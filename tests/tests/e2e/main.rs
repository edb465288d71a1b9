//! End-to-end tests against real PostgreSQL, RabbitMQ and Redis (one binary, as
//! zero2prod does: shared harness, one compile).
#![allow(clippy::unwrap_used)]

mod auth;
mod batches;
mod cli;
mod contract;
mod failures;
mod hostile;
mod http;
mod inference;
mod jobs;
mod ownership;
mod reliability;
mod webhooks;
