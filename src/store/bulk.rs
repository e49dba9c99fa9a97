//! Bulk actions: a cancel or retry request for every instance a filter
//! matches, one bounded batch per transaction, in id order (a keyset, so
//! a request always ends, however the matching rows change meanwhile).

use chrono::{DateTime, Utc};

use super::{Result, Store};
use crate::model::InstanceStatus;

/// The filter of a bulk action's batch ($2-$7), after the id $1, at most
/// $8 rows, each locked (an advance holding one is waited for, never
/// skipped: a skipped row would be passed by the keyset).
macro_rules! bulk_pick {
    ($eligible:literal) => {
        concat!(
            "WITH picked AS (
                SELECT id FROM instances
                WHERE id > $1 AND ",
            $eligible,
            "
                  AND ($2::text IS NULL OR workflow_name = $2)
                  AND ($3::text IS NULL OR status = $3)
                  AND ($4::timestamptz IS NULL OR created_at >= $4)
                  AND ($5::timestamptz IS NULL OR created_at < $5)
                  AND ($6::text[] IS NULL OR id = ANY($6))
                  AND ($7::text IS NULL OR starts_with(id, $7))
                ORDER BY id
                LIMIT $8
                FOR UPDATE)"
        )
    };
}

/// Asks each picked instance that has not ended, and was not asked
/// before, to cancel (as `request_cancel` does).
const BULK_CANCEL: &str = concat!(
    bulk_pick!(
        "status NOT IN ('completed', 'failed', 'cancelled') AND cancel_requested_at IS NULL"
    ),
    "
    UPDATE instances i
    SET cancel_requested_at = now(), cancel_reason = $9, wake_at = now()
    FROM picked p WHERE i.id = p.id
    RETURNING i.id"
);

/// Asks each picked failed instance not yet asked since it failed to run
/// again (as `request_retry` does).
const BULK_RETRY: &str = concat!(
    bulk_pick!(
        "status = 'failed' AND (retry_requested_at IS NULL OR retry_requested_at < ended_at)"
    ),
    "
    UPDATE instances i
    SET retry_requested_at = now(), wake_at = now()
    FROM picked p WHERE i.id = p.id
    RETURNING i.id"
);

/// Which instances a bulk action is for.
#[derive(Debug, Clone, Default)]
pub(crate) struct BulkFilter {
    pub workflow: Option<String>,
    pub status: Option<InstanceStatus>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    pub ids: Option<Vec<String>>,
    pub id_prefix: Option<String>,
}

/// What a bulk action asks.
#[derive(Debug, Clone)]
pub(crate) enum BulkAction {
    Cancel { reason: String },
    Retry,
}

/// One batch's work: how many were asked, and the id to go on after
/// (`None`: the filter has no more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BulkBatch {
    pub asked: u64,
    pub next_after: Option<String>,
}

impl Store {
    /// Acts on the next `limit` matching instances after the id `after`
    /// ("" at first) in one transaction.
    pub(crate) async fn bulk_batch(
        &self,
        action: &BulkAction,
        filter: &BulkFilter,
        after: &str,
        limit: i64,
    ) -> Result<BulkBatch> {
        let conn = self.conn().await?;
        let status = filter.status.map(InstanceStatus::as_str);
        let common: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
            &after,
            &filter.workflow,
            &status,
            &filter.created_after,
            &filter.created_before,
            &filter.ids,
            &filter.id_prefix,
            &limit,
        ];
        let rows = match action {
            BulkAction::Cancel { reason } => {
                let mut params = common.to_vec();
                params.push(reason);
                conn.query(BULK_CANCEL, &params).await?
            }
            BulkAction::Retry => conn.query(BULK_RETRY, &common).await?,
        };
        let last = rows.iter().map(|r| r.get::<_, String>(0)).max();
        Ok(BulkBatch {
            asked: rows.len() as u64,
            next_after: last.filter(|_| rows.len() as i64 == limit),
        })
    }
}
