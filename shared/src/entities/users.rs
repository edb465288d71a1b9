//! The `users` table: accounts.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// Lower-cased.
    pub email: String,
    /// PHC string of an argon2id hash. Never logged, never returned.
    pub password_hash: String,
    /// `user` or `operator`.
    pub role: String,
    pub email_verified_at: Option<DateTimeUtc>,
    /// Session tokens issued before this are refused.
    pub sessions_valid_after: DateTimeUtc,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
