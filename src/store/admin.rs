//! What the embedded cluster (`embedded/`) asks of a fresh server: is
//! it accepting connections, and create the database stead will use. Kept
//! here so that only the store runs SQL.

use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

const DATABASE_EXISTS: &str = "SELECT 1 FROM pg_database WHERE datname = $1";

/// Whether the server at `url` accepts a connection; the error says why not.
pub(crate) async fn can_connect(url: &str) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    drop(client);
    drop(connection);
    Ok(())
}

/// Creates `database` on the server at `admin_url` unless it exists.
pub(crate) async fn ensure_database(
    admin_url: &str,
    database: &str,
) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(admin_url, NoTls).await?;
    let connection = tokio::spawn(connection);
    let exists = client
        .query_opt(DATABASE_EXISTS, &[&database])
        .await?
        .is_some();
    if !exists {
        let create = format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\""));
        match client.batch_execute(&create).await {
            Err(e) if e.code() != Some(&SqlState::DUPLICATE_DATABASE) => return Err(e),
            _ => {}
        }
    }
    drop(client);
    let _ = connection.await;
    Ok(())
}
