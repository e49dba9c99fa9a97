//! LISTEN/NOTIFY: wake-up hints between processes. Every consumer also
//! polls, so a lost notification only costs latency.

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};

use super::{Result, Store};

/// Sends a notification on this cluster's channel `$1` (SQL `channel()`)
/// with payload `$2`.
const NOTIFY: &str = "SELECT pg_notify(channel($1), $2)";
pub(super) const NOTIFY_ADVANCE: &str = "SELECT pg_notify(channel('advance'), '')";
pub(super) const NOTIFY_QUEUES: &str =
    "SELECT pg_notify(channel('tasks'), q) FROM unnest($1::text[]) AS q";
/// One notification per payload of `ended_payloads`.
pub(super) const NOTIFY_ENDED: &str =
    "SELECT pg_notify(channel('ended'), p) FROM unnest($1::text[]) AS p";

/// Largest payload of an `ended` notification (PostgreSQL allows 8000
/// bytes).
const ENDED_PAYLOAD_BYTES: usize = 7_900;

/// The ids of instances that ended, space-separated (ids hold no spaces),
/// as few notification payloads as fit: a notification per instance would
/// cost more than the rest of the batch's writes.
pub(super) fn ended_payloads(ids: &[String]) -> Vec<String> {
    let mut payloads: Vec<String> = Vec::new();
    for id in ids {
        match payloads.last_mut() {
            Some(p) if p.len() + 1 + id.len() <= ENDED_PAYLOAD_BYTES => {
                p.push(' ');
                p.push_str(id);
            }
            _ => payloads.push(id.clone()),
        }
    }
    payloads
}

/// The instance ids of an `ended` payload.
pub(crate) fn ended_ids(payload: &str) -> impl Iterator<Item = &str> {
    payload.split(' ').filter(|id| !id.is_empty())
}

/// How many notifications a listening session buffers before it drops them
/// (a dropped one only loses a latency hint).
const LISTEN_BUFFER: usize = 1024;

/// The notification channels of a cluster (`<schema>.<name>` in SQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    /// Something needs the engine (a start, a result, a timer woke).
    Advance,
    /// A queue got new tasks; the payload is the queue.
    Tasks,
    /// An instance ended; the payload is its id.
    Ended,
}

impl Channel {
    const ALL: [Channel; 3] = [Channel::Advance, Channel::Tasks, Channel::Ended];

    fn name(self) -> &'static str {
        match self {
            Channel::Advance => "advance",
            Channel::Tasks => "tasks",
            Channel::Ended => "ended",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Notification {
    pub channel: Channel,
    pub payload: String,
}

/// A dedicated session listening on every channel of the cluster.
pub(crate) struct Listening {
    _client: Client,
    notifications: mpsc::Receiver<Notification>,
    connection: tokio::task::JoinHandle<()>,
}

impl Listening {
    /// The next notification; `None` once the connection has broken.
    pub(crate) async fn recv(&mut self) -> Option<Notification> {
        self.notifications.recv().await
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Store {
    /// Sends a NOTIFY on this cluster's `channel`, marked as this process's.
    pub(crate) async fn notify(&self, channel: Channel) -> Result<()> {
        let conn = self.conn().await?;
        conn.execute(NOTIFY, &[&channel.name(), &self.origin()])
            .await?;
        Ok(())
    }

    /// Opens a session that LISTENs on every channel of this cluster.
    pub(crate) async fn listen(&self) -> Result<Listening> {
        let mut config = self.pg_config.clone();
        // Told apart from the pool's sessions in pg_stat_activity.
        config.application_name(format!("{} listener", self.config.application_name));
        let (client, mut connection) = config.connect(self.tls.clone()).await?;
        let (tx, notifications) = mpsc::channel(LISTEN_BUFFER);
        let names: Vec<(Channel, String)> = Channel::ALL
            .iter()
            .map(|&c| (c, format!("{}.{}", self.schema(), c.name())))
            .collect();
        let listen: String = names
            .iter()
            .map(|(_, name)| format!("LISTEN \"{name}\";"))
            .collect();
        let connection = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                let AsyncMessage::Notification(n) = message else {
                    continue;
                };
                let Some(&(channel, _)) = names.iter().find(|(_, name)| name == n.channel()) else {
                    continue;
                };
                let payload = n.payload().to_string();
                // A full buffer only loses a latency hint.
                let _ = tx.try_send(Notification { channel, payload });
            }
        });
        client.batch_execute(&listen).await?;
        Ok(Listening {
            _client: client,
            notifications,
            connection,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_ids_travel_in_few_payloads_within_the_limit() {
        let ids: Vec<String> = (0..500).map(|i| format!("{i:0>36}")).collect();
        let payloads = ended_payloads(&ids);
        assert_eq!(payloads.len(), 3, "500 ids of 36 bytes fit in 3 payloads");
        assert!(payloads.iter().all(|p| p.len() <= ENDED_PAYLOAD_BYTES));
        let back: Vec<&str> = payloads.iter().flat_map(|p| ended_ids(p)).collect();
        assert_eq!(back, ids.iter().map(String::as_str).collect::<Vec<_>>());
    }
}
