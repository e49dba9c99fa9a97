//! A pooled connection and its transactions, speaking to PostgreSQL either
//! directly or through a transaction-mode pooler (PgBouncer).
//!
//! Straight to PostgreSQL, statements are named and prepared: those the
//! store marks [`Cached`] once per connection, the rest per call. Through a
//! transaction-mode pooler, consecutive transactions of one client may run
//! on different server sessions, so a statement prepared in one is unknown
//! in the next (and a name left behind may collide with another client's).
//! There every statement goes out unnamed, parsed, bound and run in one
//! message sequence (`query_typed`), with the parameter types PostgreSQL
//! would infer: learned once per statement text by preparing it on a direct
//! session of this store's own ([`Describer`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deadpool_postgres::Object;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error as PgError, Row, Statement};

use super::tls::MakeTls;

/// A parameter list as tokio-postgres takes it.
pub(crate) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// How the pool's connections run statements.
#[derive(Clone)]
pub(crate) enum Statements {
    /// Straight to PostgreSQL: named prepared statements.
    Prepared,
    /// Through a transaction-mode pooler: unnamed statements with learned
    /// parameter types.
    Unnamed(Arc<Describer>),
}

/// A statement text the direct path prepares once per connection (the hot
/// path's); through a pooler it is like any other.
#[derive(Clone, Copy)]
pub(crate) struct Cached<'a>(pub &'a str);

/// A statement ready to be sent without another round trip first (so that
/// statements pipelined behind a BEGIN go out in order).
pub(crate) enum Prepared<'a> {
    Named(Statement),
    Unnamed(&'a str, Arc<[Type]>),
}

/// What a statement method is given.
pub(crate) enum Sql<'a> {
    Text(&'a str),
    Cached(&'a str),
    Prepared(&'a Prepared<'a>),
}

impl<'a> From<&'a str> for Sql<'a> {
    fn from(text: &'a str) -> Self {
        Sql::Text(text)
    }
}

impl<'a> From<Cached<'a>> for Sql<'a> {
    fn from(cached: Cached<'a>) -> Self {
        Sql::Cached(cached.0)
    }
}

impl<'a> From<&'a Prepared<'a>> for Sql<'a> {
    fn from(prepared: &'a Prepared<'a>) -> Self {
        Sql::Prepared(prepared)
    }
}

/// A statement resolved to what goes on the wire.
enum Resolved<'a> {
    Text(&'a str),
    Named(Statement),
    Typed(&'a str, Arc<[Type]>),
}

/// The parameters paired with their types, as `query_typed` takes them.
fn typed<'p>(params: Params<'p>, types: &[Type]) -> Vec<(&'p (dyn ToSql + Sync), Type)> {
    params.iter().copied().zip(types.iter().cloned()).collect()
}

/// How many statement texts a describer remembers (the store's are a fixed
/// set, far fewer; past this it starts over rather than grow).
const MAX_DESCRIBED: usize = 1024;

/// Learns the parameter types of statement texts by preparing them on a
/// direct session, once per text.
pub(crate) struct Describer {
    config: tokio_postgres::Config,
    tls: MakeTls,
    known: Mutex<HashMap<String, Arc<[Type]>>>,
    session: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl Describer {
    pub(crate) fn new(config: tokio_postgres::Config, tls: MakeTls) -> Self {
        Describer {
            config,
            tls,
            known: Mutex::new(HashMap::new()),
            session: tokio::sync::Mutex::new(None),
        }
    }

    fn remembered(&self, sql: &str) -> Option<Arc<[Type]>> {
        self.known
            .lock()
            .expect("describer cache")
            .get(sql)
            .cloned()
    }

    async fn types(&self, sql: &str) -> Result<Arc<[Type]>, PgError> {
        if let Some(types) = self.remembered(sql) {
            return Ok(types);
        }
        let mut session = self.session.lock().await;
        let open = session.as_ref().filter(|c| !c.is_closed());
        if open.is_none() {
            let (client, connection) = self.config.connect(self.tls.clone()).await?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            *session = Some(client);
        }
        let client = session.as_ref().expect("connected above");
        let types: Arc<[Type]> = client.prepare(sql).await?.params().into();
        let mut known = self.known.lock().expect("describer cache");
        if known.len() >= MAX_DESCRIBED {
            known.clear();
        }
        known.insert(sql.to_string(), types.clone());
        Ok(types)
    }
}

/// The statement methods of [`Conn`] and [`Tx`], over `self.client()`
/// (a deadpool client or transaction: both prepare with a cache and
/// dereference to tokio-postgres's).
macro_rules! statement_methods {
    () => {
        async fn resolve<'s>(&self, sql: Sql<'s>) -> Result<Resolved<'s>, PgError> {
            Ok(match (sql, &self.statements) {
                (Sql::Prepared(Prepared::Named(st)), _) => Resolved::Named(st.clone()),
                (Sql::Prepared(Prepared::Unnamed(text, types)), _) => {
                    Resolved::Typed(*text, types.clone())
                }
                (Sql::Text(text), Statements::Prepared) => Resolved::Text(text),
                (Sql::Cached(text), Statements::Prepared) => {
                    Resolved::Named(self.client().prepare_cached(text).await?)
                }
                (Sql::Text(text) | Sql::Cached(text), Statements::Unnamed(d)) => {
                    Resolved::Typed(text, d.types(text).await?)
                }
            })
        }

        pub(crate) async fn query<'s>(
            &self,
            sql: impl Into<Sql<'s>>,
            params: Params<'_>,
        ) -> Result<Vec<Row>, PgError> {
            let c = self.client();
            match self.resolve(sql.into()).await? {
                Resolved::Text(text) => c.query(text, params).await,
                Resolved::Named(st) => c.query(&st, params).await,
                Resolved::Typed(text, types) => c.query_typed(text, &typed(params, &types)).await,
            }
        }

        pub(crate) async fn query_one<'s>(
            &self,
            sql: impl Into<Sql<'s>>,
            params: Params<'_>,
        ) -> Result<Row, PgError> {
            let c = self.client();
            match self.resolve(sql.into()).await? {
                Resolved::Text(text) => c.query_one(text, params).await,
                Resolved::Named(st) => c.query_one(&st, params).await,
                Resolved::Typed(text, types) => {
                    c.query_typed_one(text, &typed(params, &types)).await
                }
            }
        }

        pub(crate) async fn query_opt<'s>(
            &self,
            sql: impl Into<Sql<'s>>,
            params: Params<'_>,
        ) -> Result<Option<Row>, PgError> {
            let c = self.client();
            match self.resolve(sql.into()).await? {
                Resolved::Text(text) => c.query_opt(text, params).await,
                Resolved::Named(st) => c.query_opt(&st, params).await,
                Resolved::Typed(text, types) => {
                    c.query_typed_opt(text, &typed(params, &types)).await
                }
            }
        }

        pub(crate) async fn execute<'s>(
            &self,
            sql: impl Into<Sql<'s>>,
            params: Params<'_>,
        ) -> Result<u64, PgError> {
            let c = self.client();
            match self.resolve(sql.into()).await? {
                Resolved::Text(text) => c.execute(text, params).await,
                Resolved::Named(st) => c.execute(&st, params).await,
                Resolved::Typed(text, types) => c.execute_typed(text, &typed(params, &types)).await,
            }
        }

        /// Statements in the simple protocol (no parameters), as one.
        pub(crate) async fn batch_execute(&self, sql: &str) -> Result<(), PgError> {
            self.client().batch_execute(sql).await
        }
    };
}

/// A connection from the pool.
pub(crate) struct Conn {
    object: Object,
    statements: Statements,
}

impl Conn {
    pub(crate) fn new(object: Object, statements: Statements) -> Self {
        Conn { object, statements }
    }

    fn client(&self) -> &Object {
        &self.object
    }

    /// The pool's handle, to be discarded rather than returned to the pool.
    pub(crate) fn into_object(self) -> Object {
        self.object
    }

    /// Readies `sql` so that running it costs no round trip first.
    pub(crate) async fn prepare<'s>(&self, sql: &'s str) -> Result<Prepared<'s>, PgError> {
        match &self.statements {
            Statements::Prepared => Ok(Prepared::Named(self.client().prepare_cached(sql).await?)),
            Statements::Unnamed(d) => Ok(Prepared::Unnamed(sql, d.types(sql).await?)),
        }
    }

    pub(crate) async fn transaction(&mut self) -> Result<Tx<'_>, PgError> {
        Ok(Tx {
            tx: self.object.transaction().await?,
            statements: &self.statements,
        })
    }

    statement_methods!();
}

/// A transaction on a pooled connection; dropped without `commit`, it
/// rolls back.
pub(crate) struct Tx<'a> {
    tx: deadpool_postgres::Transaction<'a>,
    statements: &'a Statements,
}

impl<'a> Tx<'a> {
    fn client(&self) -> &deadpool_postgres::Transaction<'a> {
        &self.tx
    }

    pub(crate) async fn commit(self) -> Result<(), PgError> {
        self.tx.commit().await
    }

    pub(crate) async fn rollback(self) -> Result<(), PgError> {
        self.tx.rollback().await
    }

    statement_methods!();
}
