//! The `jobs` table and the indexes its queries need.

const UP: &str = r#"
CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    owner_id        uuid NOT NULL,
    model           text NOT NULL,
    status          text NOT NULL
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    input           jsonb NOT NULL,
    output          jsonb,
    error           jsonb,
    attempts        integer NOT NULL DEFAULT 0,
    idempotency_key text,
    request_hash    bytea,
    batch_id        uuid,
    worker_id       text,
    batch_size      integer,
    queue_ms        double precision,
    inference_ms    double precision,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    started_at      timestamptz,
    completed_at    timestamptz
);

-- One job per (owner, Idempotency-Key): concurrent duplicates collide here.
CREATE UNIQUE INDEX jobs_owner_idempotency_key
    ON jobs (owner_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Listing a user's jobs newest first (ids are UUIDv7, so they sort by time).
CREATE INDEX jobs_owner_id_id ON jobs (owner_id, id DESC);

-- The outbox relay: committed jobs whose message the broker never confirmed.
CREATE INDEX jobs_unpublished ON jobs (created_at)
    WHERE published_at IS NULL AND status = 'queued';
"#;

sql_migration!(UP);
