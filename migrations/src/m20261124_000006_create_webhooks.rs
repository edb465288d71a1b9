//! Webhooks: account subscriptions, per-job webhook targets, and the delivery outbox.
//!
//! Delivery rows are written by a trigger on `jobs`, so they are part of the very
//! transaction that changes a job's status, whichever code path changes it (worker,
//! cancel, deadline, dead-letter sink): a job's event cannot be lost, and since each
//! status transition happens once, it is not queued twice. The dispatcher
//! (`spool-dispatcher`) sends them.

const UP: &str = r#"
CREATE TABLE webhook_subscriptions (
    id                   uuid PRIMARY KEY,
    owner_id             uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    url                  text NOT NULL,
    events               text[] NOT NULL,
    description          text NOT NULL DEFAULT '',
    -- Needed in clear to sign (HMAC); never returned after creation, never logged.
    secret               text NOT NULL,
    -- After a rotation the old secret still signs until previous_secret_expires_at.
    previous_secret      text,
    previous_secret_expires_at timestamptz,
    -- Set when the endpoint answered 410 Gone: nothing more is sent.
    disabled_at          timestamptz,
    disabled_reason      text,
    created_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_subscriptions_owner ON webhook_subscriptions (owner_id) WHERE disabled_at IS NULL;

-- Per-job webhooks are signed with the owner's account secret (GET /v1/me/webhook-secret).
ALTER TABLE users ADD COLUMN webhook_secret text;
ALTER TABLE jobs ADD COLUMN webhook_url text, ADD COLUMN webhook_events text[];

CREATE TABLE webhook_deliveries (
    -- Also the `webhook-id` header (msg_<id>): the same on every retry of one event.
    id                uuid PRIMARY KEY,
    owner_id          uuid NOT NULL,
    -- NULL for a per-job webhook.
    subscription_id   uuid REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    job_id            uuid,
    url               text NOT NULL,
    event_type        text NOT NULL,
    -- The body, fixed when the event happened: retries send the same bytes' content.
    payload           jsonb NOT NULL,
    status            text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    -- A dispatcher holds a delivery until then; if it dies, another takes it over.
    locked_until      timestamptz,
    last_status_code  integer,
    last_error        text,
    last_latency_ms   integer,
    -- Every attempt: {at, status_code, latency_ms, error}.
    attempt_log       jsonb NOT NULL DEFAULT '[]',
    created_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_subscription ON webhook_deliveries (subscription_id, created_at DESC);

-- The job as GET /v1/jobs/{id} shows it.
CREATE FUNCTION spool_job_json(j jobs) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', j.id, 'model', j.model, 'status', j.status, 'input', j.input, 'output', j.output,
        'error', j.error, 'attempts', j.attempts, 'created_at', j.created_at,
        'started_at', j.started_at, 'completed_at', j.completed_at, 'queue_ms', j.queue_ms,
        'inference_ms', j.inference_ms, 'batch_size', j.batch_size, 'dead_lettered', j.dead_lettered,
        'start_deadline', j.start_deadline, 'batch_id', j.batch_id)
$$;

CREATE FUNCTION spool_job_webhook_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_event text := CASE NEW.status
        WHEN 'running' THEN 'job.started' WHEN 'succeeded' THEN 'job.succeeded'
        WHEN 'failed' THEN 'job.failed' WHEN 'canceled' THEN 'job.canceled' END;
    v_events text[];
    v_job jsonb;
BEGIN
    IF v_event IS NULL THEN
        RETURN NULL;
    END IF;
    v_events := ARRAY[v_event] || CASE WHEN v_event = 'job.failed' AND NEW.dead_lettered
                                       THEN ARRAY['job.dead_lettered'] ELSE ARRAY[]::text[] END;
    -- Most jobs have no listener: one indexed lookup and out.
    IF NEW.webhook_url IS NULL AND NOT EXISTS (
        SELECT 1 FROM webhook_subscriptions s
         WHERE s.owner_id = NEW.owner_id AND s.disabled_at IS NULL AND s.events && v_events) THEN
        RETURN NULL;
    END IF;
    v_job := spool_job_json(NEW);
    IF NEW.webhook_url IS NOT NULL
       AND (CASE WHEN v_event = 'job.started' THEN 'started' ELSE 'completed' END) = ANY (NEW.webhook_events) THEN
        INSERT INTO webhook_deliveries (id, owner_id, job_id, url, event_type, payload)
        VALUES (gen_random_uuid(), NEW.owner_id, NEW.id, NEW.webhook_url, v_event,
                jsonb_build_object('type', v_event, 'timestamp', now(), 'data', v_job));
    END IF;
    INSERT INTO webhook_deliveries (id, owner_id, subscription_id, job_id, url, event_type, payload)
    SELECT gen_random_uuid(), NEW.owner_id, s.id, NEW.id, s.url, e.name,
           jsonb_build_object('type', e.name, 'timestamp', now(), 'data', v_job)
      FROM webhook_subscriptions s, unnest(v_events) AS e(name)
     WHERE s.owner_id = NEW.owner_id AND s.disabled_at IS NULL AND e.name = ANY (s.events);
    PERFORM pg_notify('spool_webhooks', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_webhook_events AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION spool_job_webhook_events();
"#;

sql_migration!(UP);
