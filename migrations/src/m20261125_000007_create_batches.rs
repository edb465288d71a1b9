//! Batches: many jobs submitted at once under one handle. Each job keeps its place in
//! the batch (`batch_index`, for results in submission order) and the caller's
//! `custom_id`. A trigger keeps each batch's count of unfinished jobs; when it reaches
//! zero the batch is complete and `batch.completed` is queued for webhooks, in the same
//! transaction as the last job's status change.

const UP: &str = r#"
CREATE TABLE batches (
    id               uuid PRIMARY KEY,
    owner_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    model            text NOT NULL,
    total            integer NOT NULL,
    -- Jobs not yet succeeded, failed or canceled.
    unfinished       integer NOT NULL,
    idempotency_key  text,
    request_hash     bytea,
    webhook_url      text,
    webhook_events   text[],
    created_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz
);
CREATE UNIQUE INDEX batches_owner_idempotency_key
    ON batches (owner_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX batches_owner_id ON batches (owner_id, id DESC);

ALTER TABLE jobs ADD COLUMN batch_index integer, ADD COLUMN custom_id text;
CREATE INDEX jobs_batch ON jobs (batch_id, batch_index) WHERE batch_id IS NOT NULL;

CREATE FUNCTION spool_batch_progress() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_done boolean := OLD.status IN ('succeeded', 'failed', 'canceled');
    is_done boolean := NEW.status IN ('succeeded', 'failed', 'canceled');
    v_batch batches;
    v_data jsonb;
BEGIN
    IF was_done = is_done THEN
        RETURN NULL;
    END IF;
    -- A requeued dead letter makes its batch unfinished again.
    UPDATE batches
       SET unfinished = unfinished + CASE WHEN is_done THEN -1 ELSE 1 END,
           completed_at = CASE WHEN is_done AND unfinished = 1 THEN now() END
     WHERE id = NEW.batch_id
    RETURNING * INTO v_batch;
    IF v_batch.completed_at IS NULL THEN
        RETURN NULL;
    END IF;
    v_data := jsonb_build_object('id', v_batch.id, 'model', v_batch.model, 'total', v_batch.total,
        'created_at', v_batch.created_at, 'completed_at', v_batch.completed_at,
        'counts', (SELECT jsonb_object_agg(status, n)
                     FROM (SELECT status, count(*) AS n FROM jobs WHERE batch_id = v_batch.id GROUP BY status) c));
    INSERT INTO webhook_deliveries (id, owner_id, subscription_id, url, event_type, payload)
    SELECT gen_random_uuid(), v_batch.owner_id, s.id, s.url, 'batch.completed',
           jsonb_build_object('type', 'batch.completed', 'timestamp', now(), 'data', v_data)
      FROM webhook_subscriptions s
     WHERE s.owner_id = v_batch.owner_id AND s.disabled_at IS NULL AND 'batch.completed' = ANY (s.events)
    UNION ALL
    SELECT gen_random_uuid(), v_batch.owner_id, NULL, v_batch.webhook_url, 'batch.completed',
           jsonb_build_object('type', 'batch.completed', 'timestamp', now(), 'data', v_data)
     WHERE v_batch.webhook_url IS NOT NULL;
    PERFORM pg_notify('spool_webhooks', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_batch_progress AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.batch_id IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION spool_batch_progress();
"#;

sql_migration!(UP);
