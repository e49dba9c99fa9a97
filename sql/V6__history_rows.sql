-- stead schema, version 6: the history as one row per transition.
--
-- A transition (one commit of the engine for one instance) writes one row
-- holding all of its events, instead of one row per event. The documented
-- view `events` still shows one row per event, as the table of that name
-- did before.

CREATE TABLE history (
    instance_id text NOT NULL,
    -- The sequence number of the row's first event; the others follow.
    seq         integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- The member whose advancer made the transition.
    member      text,
    -- [{type, step_id?, attempt?, data, at?}], in order; `at` is set on an
    -- event that happened after the row's created_at (a step run inside
    -- the transition).
    events      jsonb NOT NULL CHECK (jsonb_typeof(events) = 'array'),
    PRIMARY KEY (instance_id, seq)
);

INSERT INTO history (instance_id, seq, created_at, member, events)
SELECT instance_id, seq, created_at, member,
       jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
           'type', type, 'step_id', step_id, 'attempt', attempt)) || jsonb_build_object('data', data))
FROM events;

DROP TABLE events;

-- The ordered event log, one row per event (what stead.events was).
CREATE VIEW events AS
SELECT h.instance_id,
       h.seq + e.n::integer - 1 AS seq,
       e.ev ->> 'type' AS type,
       e.ev ->> 'step_id' AS step_id,
       (e.ev ->> 'attempt')::integer AS attempt,
       coalesce(e.ev -> 'data', '{}'::jsonb) AS data,
       coalesce((e.ev ->> 'at')::timestamptz, h.created_at) AS created_at,
       h.member
FROM history h
CROSS JOIN LATERAL jsonb_array_elements(h.events) WITH ORDINALITY AS e(ev, n);

-- Room on each page for updated rows, so that an update changing no indexed
-- column stays on its page (a HOT update: no index entries to write).
ALTER TABLE instances SET (fillfactor = 80);
ALTER TABLE steps SET (fillfactor = 80);
ALTER TABLE tasks SET (fillfactor = 70);
