-- stead schema, version 13: API keys.
--
-- A key is shown once, when it is made; this table keeps its id, what it may
-- do, and the SHA-256 of its secret (the secret itself is never stored, and
-- never sent to the database: the API compares digests). A revoked key keeps
-- its row, so that `stead key list` shows when it was revoked.
CREATE TABLE api_keys (
    id            text PRIMARY KEY,
    name          text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'operator', 'worker', 'reader')),
    -- The queues a worker key may claim and finish tasks of (only worker
    -- keys name queues, and a worker key names at least one).
    queues        text[] NOT NULL DEFAULT '{}',
    secret_sha256 bytea NOT NULL CHECK (length(secret_sha256) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    CHECK ((role = 'worker') = (cardinality(queues) > 0))
);
