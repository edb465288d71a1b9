//! Every schema change, forward-only. The API runs pending migrations at start.

pub use sea_orm_migration::prelude::*;

/// A migration that runs one SQL script: every migration here is one (constraints,
/// triggers and partial indexes read more clearly in SQL than in the builder). The
/// migration's name, its key in `seaql_migrations`, is the file's name.
macro_rules! sql_migration {
    ($sql:expr) => {
        #[derive(sea_orm_migration::prelude::DeriveMigrationName)]
        pub struct Migration;

        #[sea_orm_migration::prelude::async_trait::async_trait]
        impl sea_orm_migration::prelude::MigrationTrait for Migration {
            async fn up(
                &self,
                manager: &sea_orm_migration::prelude::SchemaManager,
            ) -> Result<(), sea_orm_migration::prelude::DbErr> {
                use sea_orm_migration::prelude::ConnectionTrait;
                manager.get_connection().execute_unprepared($sql).await?;
                Ok(())
            }
        }
    };
}

mod m20261124_000001_create_jobs;
mod m20261124_000002_create_identity;
mod m20261124_000003_add_dead_letters;
mod m20261124_000004_add_start_deadline;
// No 000005 ever existed: the webhooks migration was added as 000006 (d85d361). Never renumber (see the test).
mod m20261124_000006_create_webhooks;
mod m20261125_000007_create_batches;
mod m20261125_000008_index_queued_jobs;
mod m20261125_000009_count_batch_progress_per_statement;
mod m20261125_000010_shard_usage_counters;
mod m20261129_000011_add_job_request_id;
mod m20261129_000012_job_json_with_request_id;
mod m20261129_000013_index_deliveries_by_job;
mod m20261129_000014_rotate_job_webhook_secret;
mod m20261129_000015_add_job_claim_token;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_create_jobs::Migration),
            Box::new(m20261124_000002_create_identity::Migration),
            Box::new(m20261124_000003_add_dead_letters::Migration),
            Box::new(m20261124_000004_add_start_deadline::Migration),
            Box::new(m20261124_000006_create_webhooks::Migration),
            Box::new(m20261125_000007_create_batches::Migration),
            Box::new(m20261125_000008_index_queued_jobs::Migration),
            Box::new(m20261125_000009_count_batch_progress_per_statement::Migration),
            Box::new(m20261125_000010_shard_usage_counters::Migration),
            Box::new(m20261129_000011_add_job_request_id::Migration),
            Box::new(m20261129_000012_job_json_with_request_id::Migration),
            Box::new(m20261129_000013_index_deliveries_by_job::Migration),
            Box::new(m20261129_000014_rotate_job_webhook_secret::Migration),
            Box::new(m20261129_000015_add_job_claim_token::Migration),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migration's name is its key in `seaql_migrations`: renaming one would run it
    /// again on every existing database.
    #[test]
    fn migration_names_never_change() {
        let names: Vec<String> = Migrator::migrations().iter().map(|m| m.name().to_owned()).collect();
        assert_eq!(
            names,
            [
                "m20261124_000001_create_jobs",
                "m20261124_000002_create_identity",
                "m20261124_000003_add_dead_letters",
                "m20261124_000004_add_start_deadline",
                "m20261124_000006_create_webhooks",
                "m20261125_000007_create_batches",
                "m20261125_000008_index_queued_jobs",
                "m20261125_000009_count_batch_progress_per_statement",
                "m20261125_000010_shard_usage_counters",
                "m20261129_000011_add_job_request_id",
                "m20261129_000012_job_json_with_request_id",
                "m20261129_000013_index_deliveries_by_job",
                "m20261129_000014_rotate_job_webhook_secret",
                "m20261129_000015_add_job_claim_token"
            ]
        );
    }
}
