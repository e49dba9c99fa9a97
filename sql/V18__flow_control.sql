-- stead schema, version 18: flow control.
--
-- Queues may be paused, limited in how many tasks are leased at once, and
-- limited in claims per second (a token bucket: `tokens` as of
-- `tokens_at`, refilled at rate_per_second up to rate_burst). A claim on
-- such a queue locks its row, so the limits hold across every node. A
-- queue without a row here has no limits.
CREATE TABLE queues (
    name            text PRIMARY KEY,
    paused          boolean NOT NULL DEFAULT false,
    max_leased      integer CHECK (max_leased > 0),
    rate_per_second double precision CHECK (rate_per_second > 0),
    rate_burst      integer CHECK (rate_burst > 0),
    tokens          double precision NOT NULL DEFAULT 0,
    tokens_at       timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((rate_per_second IS NULL) = (rate_burst IS NULL))
);

-- Workflows whose new instances are held (pending, held = 'paused') until
-- they are resumed.
CREATE TABLE workflow_controls (
    name       text PRIMARY KEY,
    paused     boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Why a pending instance does not start: 'paused' (its workflow is), or
-- 'concurrency' (its key is at the workflow's limit; it waits its turn in
-- start order). NULL: it is not held.
ALTER TABLE instances ADD COLUMN held text CHECK (held IN ('paused', 'concurrency'));
-- The rendered concurrency key of an instance of a workflow that declares
-- one, set when it was first admitted or held.
ALTER TABLE instances ADD COLUMN concurrency_key text;

-- The instances of a key that have not ended: those running (held IS
-- NULL) and those waiting, in start order.
CREATE INDEX instances_concurrency ON instances (workflow_name, concurrency_key, created_at, id)
    WHERE concurrency_key IS NOT NULL AND ended_at IS NULL;
CREATE INDEX instances_held ON instances (workflow_name, created_at, id) WHERE held IS NOT NULL;

-- Operator view: each queue's limits beside its depth.
CREATE VIEW queue_controls AS
SELECT coalesce(q.name, d.queue) AS queue,
       coalesce(q.paused, false) AS paused,
       q.max_leased, q.rate_per_second, q.rate_burst,
       coalesce(d.ready, 0) AS ready, coalesce(d.leased, 0) AS leased,
       coalesce(d.delayed, 0) AS delayed
FROM queues q
FULL JOIN queue_depth d ON d.queue = q.name;
