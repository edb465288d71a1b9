//! `GET /v1/models` reports each model's queue depth: jobs waiting to run.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("CREATE INDEX jobs_queued_model ON jobs (model) WHERE status = 'queued'")
            .await?;
        Ok(())
    }
}
