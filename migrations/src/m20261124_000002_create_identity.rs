//! Accounts, single-use email tokens, API tokens and per-model usage counters.

const UP: &str = r#"
CREATE TABLE users (
    id                    uuid PRIMARY KEY,
    -- Stored lower-cased: one account per address whatever its case.
    email                 text NOT NULL UNIQUE,
    password_hash         text NOT NULL,
    role                  text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'operator')),
    email_verified_at     timestamptz,
    -- Session tokens issued before this instant are refused (set by a password reset).
    sessions_valid_after  timestamptz NOT NULL DEFAULT now(),
    created_at            timestamptz NOT NULL DEFAULT now()
);

-- Email verification and password reset links. Only a hash of the token is stored.
CREATE TABLE email_tokens (
    id          uuid PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose     text NOT NULL CHECK (purpose IN ('verify_email', 'reset_password')),
    token_hash  bytea NOT NULL UNIQUE,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Long-lived tokens for scripts. The id is the token's `jti`; the token itself is never stored.
CREATE TABLE api_tokens (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name          text NOT NULL,
    scopes        text[] NOT NULL,
    expires_at    timestamptz,
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_tokens_user_id ON api_tokens (user_id, created_at DESC);

-- Usage per user and model, kept incrementally by the API (submissions) and the worker
-- (results, in the same statement that records them).
CREATE TABLE usage (
    user_id            uuid NOT NULL,
    model              text NOT NULL,
    submitted          bigint NOT NULL DEFAULT 0,
    succeeded          bigint NOT NULL DEFAULT 0,
    failed             bigint NOT NULL DEFAULT 0,
    inference_ms_total double precision NOT NULL DEFAULT 0,
    last_used_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, model)
);
"#;

sql_migration!(UP);
