//! Failure handling: each job keeps the history of its attempts and whether it was
//! dead-lettered; operators' actions are audit-logged.

const UP: &str = r#"
ALTER TABLE jobs
    ADD COLUMN dead_lettered boolean NOT NULL DEFAULT false,
    -- One entry per finished attempt: {attempt, worker_id, started_at, finished_at, outcome, error}.
    ADD COLUMN attempt_log jsonb NOT NULL DEFAULT '[]';

CREATE INDEX jobs_dead_letters ON jobs (completed_at DESC) WHERE dead_lettered;

CREATE TABLE audit_log (
    id          uuid PRIMARY KEY,
    actor_id    uuid NOT NULL,
    action      text NOT NULL,
    detail      jsonb NOT NULL,
    affected    bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
"#;

sql_migration!(UP);
