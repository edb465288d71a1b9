//! HTTP routes: one `#[OpenApi]` struct per resource.

pub mod admin;
pub mod auth;
pub mod health;
pub mod jobs;
pub mod me;
pub mod models;
pub mod tokens;

use poem_openapi::Tags;

#[derive(Tags)]
pub enum ApiTags {
    /// Submit inference jobs, poll them, list and cancel them.
    Jobs,
    /// Accounts, sessions, API tokens and usage.
    Account,
    /// The models jobs can run on.
    Models,
    /// Dead letters and other operator tools (operator role required).
    Operators,
    /// Liveness and readiness probes.
    Health,
}
