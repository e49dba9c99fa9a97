//! Membership: each member's dedicated session (registration, heartbeat,
//! removal of the dead, slot and duty locks) and the cluster as operators
//! see it (`members_overview`, `slot_owners`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use super::{Result, Store};

const LOCK_CLASS: &str = "SELECT lock_class, slot_count FROM cluster";

/// Registers (or re-registers) a member on this session.
const REGISTER_MEMBER: &str = "
    INSERT INTO members (name, backend_pid, backend_start, ttl_ms, api_url)
    SELECT $1, pg_backend_pid(),
           (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()), $2, $3
    ON CONFLICT (name) DO UPDATE
    SET backend_pid = excluded.backend_pid, backend_start = excluded.backend_start,
        ttl_ms = excluded.ttl_ms, api_url = excluded.api_url,
        joined_at = now(), heartbeat_at = now()";

/// Heartbeats; no row means this member was removed (it must rejoin).
const HEARTBEAT_MEMBER: &str = "
    UPDATE members SET heartbeat_at = now()
    WHERE name = $1 AND backend_pid = pg_backend_pid()
    RETURNING name";

/// Removes members past their TTL or whose session is gone, and terminates
/// their sessions so the slot locks they held are released.
const REAP_MEMBERS: &str = "
    WITH dead AS (
        DELETE FROM members m
        WHERE m.name <> $1
          AND (m.heartbeat_at + make_interval(secs => m.ttl_ms / 1000.0) < now()
               OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                              WHERE a.pid = m.backend_pid
                                AND a.backend_start IS NOT DISTINCT FROM m.backend_start))
        RETURNING m.name, m.backend_pid, m.backend_start, m.heartbeat_at
    )
    SELECT d.name, extract(epoch FROM now() - d.heartbeat_at)::float8,
           (SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a
            WHERE a.pid = d.backend_pid AND a.backend_start IS NOT DISTINCT FROM d.backend_start)
    FROM dead d";

/// Live members: heartbeat within the TTL by database time, and the session
/// still there (so every member notices a crashed one at its next heartbeat,
/// without waiting for the maintenance holder to remove it).
const LIVE_MEMBERS: &str = "
    SELECT m.name FROM members m
    WHERE m.heartbeat_at + make_interval(secs => m.ttl_ms / 1000.0) >= now()
      AND EXISTS (SELECT 1 FROM pg_stat_activity a
                  WHERE a.pid = m.backend_pid
                    AND a.backend_start IS NOT DISTINCT FROM m.backend_start)
    ORDER BY m.name";

/// Takes a singleton duty's lock for this session.
const TRY_LOCK_DUTY: &str = "SELECT pg_try_advisory_lock($1, $2)";
/// Takes the slots' locks that are free and claims them for member $3;
/// returns each slot taken and whether its previous holder died holding it
/// (it never released it).
const TRY_LOCK_SLOTS: &str = "
    WITH got AS MATERIALIZED (
        SELECT s FROM unnest($2::int[]) AS s WHERE pg_try_advisory_lock($1, s)
    ), prior AS (
        SELECT c.slot, c.released FROM slot_claims c WHERE c.slot IN (SELECT s FROM got)
    ), claimed AS (
        INSERT INTO slot_claims (slot, member) SELECT s, $3 FROM got
        ON CONFLICT (slot) DO UPDATE
        SET member = excluded.member, claimed_at = now(), released = false
    )
    SELECT got.s, coalesce(NOT prior.released, false)
    FROM got LEFT JOIN prior ON prior.slot = got.s";
/// Releases member $3's slots $2, marking them released first.
const UNLOCK_SLOTS: &str = "
    WITH released AS (
        UPDATE slot_claims SET released = true WHERE slot = ANY($2) AND member = $3
    )
    SELECT s FROM unnest($2::int[]) AS s WHERE pg_advisory_unlock($1, s)";
const LEAVE_MEMBER: &str = "
    WITH released AS (UPDATE slot_claims SET released = true WHERE member = $1)
    DELETE FROM members WHERE name = $1 AND backend_pid = pg_backend_pid()";

const CLUSTER_MEMBERS: &str = "
    SELECT name, alive, heartbeat_at, extract(epoch FROM since_heartbeat)::float8, ttl_ms,
           joined_at, api_url
    FROM members_overview ORDER BY name";
const CLUSTER_SLOTS: &str = "SELECT slot, owner FROM slot_owners ORDER BY slot";
/// Live members, slots, and slots some member's session holds (from
/// `pg_locks`): the cluster gauges the maintenance-duty holder exports.
const CLUSTER_COUNTS: &str = "
    SELECT (SELECT count(*) FROM members_overview WHERE alive),
           (SELECT slot_count FROM cluster)::bigint,
           (SELECT count(DISTINCT slot) FROM slot_owners WHERE owner IS NOT NULL)";

/// A slot whose lock a member took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotTaken {
    pub slot: i32,
    /// Its previous holder never released it: it died holding it, maybe in
    /// the middle of inline attempts.
    pub holder_died: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct MemberRecord {
    pub name: String,
    pub alive: bool,
    pub heartbeat_at: DateTime<Utc>,
    pub since_heartbeat_s: f64,
    pub ttl_ms: i32,
    pub joined_at: DateTime<Utc>,
    pub api_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClusterCounts {
    pub members_alive: i64,
    pub slots: i64,
    pub slots_owned: i64,
}

impl Store {
    /// Opens a member's dedicated session. TCP keepalives on both ends and
    /// a TCP user timeout on the server make a silent peer (partition,
    /// frozen process) drop within about `ttl_ms` instead of hours.
    pub(crate) async fn connect_member(&self, name: &str, ttl_ms: u64) -> Result<MemberSession> {
        let mut config = self.pg_config.clone();
        let idle_s = (ttl_ms / 4000).max(1);
        config.options(format!(
            "-c search_path={} -c statement_timeout={} -c tcp_keepalives_idle={idle_s} \
             -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3 -c tcp_user_timeout={ttl_ms}",
            self.schema(),
            (ttl_ms / 2).max(1000)
        ));
        config.application_name(format!("stead member {name}"));
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(idle_s));
        config.keepalives_interval(Duration::from_secs(1));
        config.keepalives_retries(3);
        config.connect_timeout(Duration::from_millis((ttl_ms / 2).max(1000)));
        let (client, connection) = config.connect(self.tls.clone()).await?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let row = client.query_one(LOCK_CLASS, &[]).await?;
        Ok(MemberSession {
            client,
            connection,
            lock_class: row.get(0),
            slot_count: row.get(1),
        })
    }

    /// Every member with its liveness (`members_overview`).
    pub(crate) async fn cluster_members(&self) -> Result<Vec<MemberRecord>> {
        let conn = self.conn().await?;
        let rows = conn.query(CLUSTER_MEMBERS, &[]).await?;
        Ok(rows
            .iter()
            .map(|r| MemberRecord {
                name: r.get(0),
                alive: r.get(1),
                heartbeat_at: r.get(2),
                since_heartbeat_s: r.get(3),
                ttl_ms: r.get(4),
                joined_at: r.get(5),
                api_url: r.get(6),
            })
            .collect())
    }

    /// Slot -> owner as pg_locks shows it.
    pub(crate) async fn slot_owners(&self) -> Result<Vec<(i32, Option<String>)>> {
        let conn = self.conn().await?;
        let rows = conn.query(CLUSTER_SLOTS, &[]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Live members, slots and owned slots, in one statement.
    pub(crate) async fn cluster_counts(&self) -> Result<ClusterCounts> {
        let conn = self.conn().await?;
        let row = conn.query_one(CLUSTER_COUNTS, &[]).await?;
        Ok(ClusterCounts {
            members_alive: row.get(0),
            slots: row.get(1),
            slots_owned: row.get(2),
        })
    }
}

/// A member's dedicated session (not pooled): it heartbeats and holds the
/// member's slot locks, which PostgreSQL releases when the session ends.
pub(crate) struct MemberSession {
    client: Client,
    connection: tokio::task::JoinHandle<()>,
    lock_class: i32,
    pub slot_count: i32,
}

impl MemberSession {
    /// True once the connection has failed; the session must be replaced.
    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed() || self.connection.is_finished()
    }

    pub(crate) async fn register(
        &self,
        name: &str,
        ttl_ms: u64,
        api_url: Option<&str>,
    ) -> Result<()> {
        self.client
            .execute(REGISTER_MEMBER, &[&name, &(ttl_ms as i32), &api_url])
            .await?;
        Ok(())
    }

    /// False if this member's row is gone (it was judged dead).
    pub(crate) async fn heartbeat(&self, name: &str) -> Result<bool> {
        Ok(self
            .client
            .query_opt(HEARTBEAT_MEMBER, &[&name])
            .await?
            .is_some())
    }

    /// Removes dead members (and ends their sessions); returns their names
    /// with the seconds since their last heartbeat.
    pub(crate) async fn reap_members(&self, me: &str) -> Result<Vec<(String, f64)>> {
        let rows = self.client.query(REAP_MEMBERS, &[&me]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub(crate) async fn live_members(&self) -> Result<Vec<String>> {
        let rows = self.client.query(LIVE_MEMBERS, &[]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Tries to take a singleton duty's lock (held until the session ends).
    /// Call it only while not holding it: session locks stack.
    pub(crate) async fn try_lock_duty(&self, duty: i32) -> Result<bool> {
        let row = self
            .client
            .query_one(TRY_LOCK_DUTY, &[&self.lock_class, &duty])
            .await?;
        Ok(row.get(0))
    }

    /// Tries to take the slots' locks for member `name`; returns the slots
    /// it got, each with whether its previous holder died holding it.
    pub(crate) async fn try_lock_slots(&self, name: &str, slots: &[i32]) -> Result<Vec<SlotTaken>> {
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .client
            .query(TRY_LOCK_SLOTS, &[&self.lock_class, &slots, &name])
            .await?;
        Ok(rows
            .iter()
            .map(|r| SlotTaken {
                slot: r.get(0),
                holder_died: r.get(1),
            })
            .collect())
    }

    /// Releases member `name`'s locks on `slots`, recording a clean release.
    pub(crate) async fn unlock_slots(&self, name: &str, slots: &[i32]) -> Result<()> {
        if !slots.is_empty() {
            self.client
                .query(UNLOCK_SLOTS, &[&self.lock_class, &slots, &name])
                .await?;
        }
        Ok(())
    }

    /// Leaves the cluster (clean shutdown); the session's end frees the locks.
    pub(crate) async fn leave(self, name: &str) {
        let _ = self.client.execute(LEAVE_MEMBER, &[&name]).await;
        drop(self.client);
        let _ = self.connection.await;
    }
}
