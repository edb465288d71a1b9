//! A job remembers the `x-request-id` of the request that created it: the worker logs it
//! with the job's outcome, so one id finds a job's lines in the API's and the worker's logs.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared("ALTER TABLE jobs ADD COLUMN request_id text").await?;
        Ok(())
    }
}
