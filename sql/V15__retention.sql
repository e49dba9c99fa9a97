-- stead schema, version 15: retention.
--
-- Ended instances are deleted, with their steps, tasks, signals and
-- history, once older than their workflow version's retention (NULL: the
-- node's --retention; 0: kept for ever). The maintenance-duty holder finds
-- them per workflow version, oldest end first, through instances_ended, so
-- one version's long retention never makes another's deletions rescan it.
ALTER TABLE workflows ADD COLUMN retention_ms bigint CHECK (retention_ms >= 0);

CREATE INDEX instances_ended ON instances (workflow_name, workflow_version, ended_at)
    WHERE ended_at IS NOT NULL;

-- Consumed signals leave signals_pending; deleting an instance's signals
-- needs them all.
CREATE INDEX signals_by_instance ON signals (instance_id);
