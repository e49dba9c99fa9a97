//! Retention: deleting ended instances (with their steps, tasks, signals and
//! history) once they are older than their workflow version's retention.
//!
//! Only trees go: a root instance (no parent) that is due, together with
//! every descendant, and only if every one of them has ended. A child is
//! never deleted on its own, so a running parent never loses one.

use super::{Result, Store};

/// Root instances due for deletion: per workflow version, the oldest ends
/// first, through `instances_ended` (so a version kept longer is never
/// rescanned for another's). A root with a child still running is left for
/// a later run.
const DUE_ROOTS: &str = "
    SELECT i.id
    FROM workflows w
    CROSS JOIN LATERAL (
        SELECT id FROM instances i
        WHERE i.workflow_name = w.name AND i.workflow_version = w.version
          AND i.ended_at IS NOT NULL
          AND i.ended_at < now() - coalesce(w.retention_ms, $1) * interval '1 millisecond'
          AND i.parent_id IS NULL
          AND NOT EXISTS (SELECT 1 FROM instances c
                          WHERE c.parent_id = i.id AND c.ended_at IS NULL)
        ORDER BY i.ended_at
        LIMIT $2) i
    WHERE coalesce(w.retention_ms, $1) > 0
    LIMIT $2";

/// The trees under `$1`, locked in id order (so two runs cannot deadlock),
/// each row with its root and whether it may go: ended, and for the root
/// still due (a retry may have run it again since `DUE_ROOTS`).
const LOCK_TREES: &str = "
    WITH RECURSIVE tree (id, root) AS (
        SELECT id, id FROM instances WHERE id = ANY($1)
        UNION ALL
        SELECT c.id, t.root FROM instances c JOIN tree t ON c.parent_id = t.id
    )
    SELECT t.root, i.id,
           i.ended_at IS NOT NULL
           AND (i.id <> t.root
                OR i.ended_at < now() - coalesce(w.retention_ms, $2) * interval '1 millisecond')
    FROM tree t
    JOIN instances i ON i.id = t.id
    JOIN workflows w ON w.name = i.workflow_name AND w.version = i.workflow_version
    ORDER BY i.id
    FOR UPDATE OF i";

const DELETE_TREES: &str = "
    WITH s AS (DELETE FROM steps WHERE instance_id = ANY($1) RETURNING 1),
         t AS (DELETE FROM tasks WHERE instance_id = ANY($1) RETURNING 1),
         g AS (DELETE FROM signals WHERE instance_id = ANY($1) RETURNING 1),
         h AS (DELETE FROM history WHERE instance_id = ANY($1) RETURNING 1),
         i AS (DELETE FROM instances WHERE id = ANY($1) RETURNING 1)
    SELECT (SELECT count(*) FROM i), (SELECT count(*) FROM s), (SELECT count(*) FROM t),
           (SELECT count(*) FROM g), (SELECT count(*) FROM h)";

/// Seconds since the oldest stored ended instance ended, 0 if none (one
/// index probe per workflow version).
const OLDEST_ENDED_AGE: &str = "
    SELECT coalesce(extract(epoch FROM now() - min(e.ended_at)), 0)::float8
    FROM workflows w
    CROSS JOIN LATERAL (
        SELECT ended_at FROM instances i
        WHERE i.workflow_name = w.name AND i.workflow_version = w.version
          AND i.ended_at IS NOT NULL
        ORDER BY i.ended_at
        LIMIT 1) e";

/// Rows one retention batch deleted, per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Purged {
    /// Root instances found due (the batch is full when this reaches its
    /// size).
    pub roots: u64,
    pub instances: u64,
    pub steps: u64,
    pub tasks: u64,
    pub signals: u64,
    pub history: u64,
}

impl Store {
    /// Deletes up to `max_roots` due trees in one transaction;
    /// `default_retention_ms` applies to versions that set none (0 keeps
    /// them).
    pub(crate) async fn purge_ended(
        &self,
        default_retention_ms: u64,
        max_roots: i64,
    ) -> Result<Purged> {
        let default_ms = default_retention_ms as i64;
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let roots: Vec<String> = tx
            .query(DUE_ROOTS, &[&default_ms, &max_roots])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if roots.is_empty() {
            tx.rollback().await?;
            return Ok(Purged::default());
        }
        let rows = tx.query(LOCK_TREES, &[&roots, &default_ms]).await?;
        let members: Vec<(String, String, bool)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let ids = deletable(&members);
        let mut purged = Purged {
            roots: roots.len() as u64,
            ..Purged::default()
        };
        if !ids.is_empty() {
            let row = tx.query_one(DELETE_TREES, &[&ids]).await?;
            let count = |i: usize| row.get::<_, i64>(i) as u64;
            purged.instances = count(0);
            purged.steps = count(1);
            purged.tasks = count(2);
            purged.signals = count(3);
            purged.history = count(4);
        }
        tx.commit().await?;
        Ok(purged)
    }

    /// Seconds since the oldest stored ended instance ended (0: none is).
    pub(crate) async fn oldest_ended_age_s(&self) -> Result<f64> {
        let conn = self.conn().await?;
        Ok(conn.query_one(OLDEST_ENDED_AGE, &[]).await?.get(0))
    }
}

/// The ids of every tree all of whose members may go: `(root, id, may_go)`.
fn deletable(members: &[(String, String, bool)]) -> Vec<String> {
    use std::collections::BTreeSet;
    let kept: BTreeSet<&str> = members
        .iter()
        .filter(|(_, _, may_go)| !may_go)
        .map(|(root, _, _)| root.as_str())
        .collect();
    members
        .iter()
        .filter(|(root, _, _)| !kept.contains(root.as_str()))
        .map(|(_, id, _)| id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::deletable;

    fn row(root: &str, id: &str, may_go: bool) -> (String, String, bool) {
        (root.into(), id.into(), may_go)
    }

    #[test]
    fn a_tree_goes_whole_or_not_at_all() {
        let members = [
            row("a", "a", true),
            row("a", "a-child", true),
            row("b", "b", true),
            row("b", "b-child", false),
            row("c", "c", false),
        ];
        assert_eq!(deletable(&members), ["a", "a-child"]);
    }
}
