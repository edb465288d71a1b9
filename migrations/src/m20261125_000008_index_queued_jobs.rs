//! `GET /v1/models` reports each model's queue depth: jobs waiting to run.

sql_migration!("CREATE INDEX jobs_queued_model ON jobs (model) WHERE status = 'queued'");
