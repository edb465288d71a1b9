//! Webhook payloads carry the job as `GET /v1/jobs/{id}` shows it: `request_id` (added in
//! 000011) joins the other fields.

const UP: &str = r#"
CREATE OR REPLACE FUNCTION spool_job_json(j jobs) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', j.id, 'model', j.model, 'status', j.status, 'input', j.input, 'output', j.output,
        'error', j.error, 'attempts', j.attempts, 'created_at', j.created_at,
        'started_at', j.started_at, 'completed_at', j.completed_at, 'queue_ms', j.queue_ms,
        'inference_ms', j.inference_ms, 'batch_size', j.batch_size, 'dead_lettered', j.dead_lettered,
        'start_deadline', j.start_deadline, 'batch_id', j.batch_id, 'request_id', j.request_id)
$$;
"#;

sql_migration!(UP);
