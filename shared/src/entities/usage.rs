//! The `usage` table: per user and model counters, kept incrementally. Each database
//! connection adds to its own shard (the column's default), so concurrent submissions do
//! not queue on one row; readers sum the shards.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "usage")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub user_id: Uuid,
    #[sea_orm(primary_key, auto_increment = false)]
    pub model: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub shard: i16,
    pub submitted: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub inference_ms_total: f64,
    pub last_used_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// One user's counters for one model, summed over the shards.
#[derive(Clone, Debug, PartialEq, sea_orm::FromQueryResult)]
pub struct Totals {
    pub model: String,
    pub submitted: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub inference_ms_total: f64,
    pub last_used_at: DateTimeUtc,
}
