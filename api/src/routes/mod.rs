//! HTTP routes: one `#[OpenApi]` struct per resource.

pub mod admin;
pub mod auth;
pub mod batches;
pub mod health;
pub mod jobs;
pub mod me;
pub mod models;
pub mod tokens;
pub mod webhooks;

use poem_openapi::Tags;

#[derive(Tags)]
pub enum ApiTags {
    /// Submit inference jobs, poll them, list and cancel them.
    Jobs,
    /// Accounts, sessions, API tokens and usage.
    Account,
    /// The models jobs can run on.
    Models,
    /// Signed callbacks on job events: subscriptions, deliveries, secrets.
    Webhooks,
    /// Dead letters and other operator tools (operator role required).
    Operators,
    /// Liveness and readiness probes.
    Health,
}
