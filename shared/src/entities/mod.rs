//! sea-orm entities, one module per table.

pub mod api_tokens;
pub mod jobs;
pub mod usage;
pub mod users;
