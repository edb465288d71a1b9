//! `GET /v1/jobs/{id}/deliveries` reads a job's webhook deliveries by `job_id`.

sql_migration!("CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id) WHERE job_id IS NOT NULL");
