//! For unit tests that need a real PostgreSQL: the process's shared private
//! server (`embedded::shared_test_server`), and a fresh, migrated database
//! per test.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::embedded::shared_test_server;
use crate::store::{Store, StoreConfig};

/// The slots of a test database.
pub(crate) const SLOTS: u32 = 16;

/// A fresh database with stead's schema: the store, and a plain client on
/// the same database (for what a test reads or changes behind its back).
pub(crate) async fn fresh_database() -> (Store, tokio_postgres::Client) {
    fresh_database_at(None).await
}

/// A fresh database migrated up to `version` (all migrations for `None`).
pub(crate) async fn fresh_database_at(version: Option<u32>) -> (Store, tokio_postgres::Client) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let server = tokio::task::spawn_blocking(shared_test_server)
        .await
        .expect("the unit-test PostgreSQL")
        .unwrap_or_else(|e| panic!("unit-test PostgreSQL is not available: {e}"));
    let name = format!(
        "unit_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    crate::store::ensure_database(&server.url, &name)
        .await
        .expect("creating a test database");
    let url = server.cluster.url(&name);
    let store = Store::new(StoreConfig {
        database_url: url.clone(),
        direct_database_url: None,
        schema: "stead".into(),
        pool_size: 4,
        pool_wait_timeout_ms: 10_000,
        statement_timeout_ms: 30_000,
        idle_in_transaction_timeout_ms: 0,
        application_name: "stead unit test".into(),
    })
    .expect("a store");
    store.migrate_to(SLOTS, version).await.expect("migrations");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connecting to the test database");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    (store, client)
}
