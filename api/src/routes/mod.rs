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
use uuid::Uuid;

use crate::error::ApiError;

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

/// A path's id. Anything that is not a UUID names nothing of the caller's, so it gets the
/// same 404 (`not_found`) as an id of someone else's.
fn parse_id(raw: &str, not_found: ApiError) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| not_found)
}

/// A list's `cursor` parameter: the previous page's `next_cursor`. Empty, like absent, is
/// the first page (scripts often send `cursor=` with nothing yet).
fn parse_cursor(cursor: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    match cursor {
        None | Some("") => Ok(None),
        Some(cursor) => Uuid::parse_str(cursor)
            .map(Some)
            .map_err(|_| ApiError::InvalidParameter("cursor: not a next_cursor from this list".into())),
    }
}
