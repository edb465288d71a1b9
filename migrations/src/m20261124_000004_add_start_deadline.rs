//! A job may carry a time-to-start deadline: past it, a worker fails the job with
//! `deadline_exceeded` instead of running it.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared("ALTER TABLE jobs ADD COLUMN start_deadline timestamptz").await?;
        Ok(())
    }
}
