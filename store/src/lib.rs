//! Reefline's database: the schema (`migrations/`) and the queries each service may run on it.
//!
//! Each service's queries are a module of their own, named for it; a service calls its own module
//! (and [`submissions`], which ingest and the sink share) and no other. The queries are
//! `sqlx::query!` and its kin, checked against the schema when they are compiled: a wrong column, or
//! a value of the wrong type for a column, fails the build (an argument passed `as _`, an array
//! the macros cannot match to its column, is checked by Postgres only). `.sqlx/` holds that check's record, so a build needs no database;
//! `scripts/sqlx-prepare.sh` writes it again after a query or a migration changes.
//!
//! | table                   | written by                                   | read by                       |
//! |-------------------------|----------------------------------------------|-------------------------------|
//! | `requests`              | ingest and the sink ([`submissions`])        | the sink                      |
//! | `batches`               | ingest ([`submissions`], its feeds), the sink | the sink, ingest (its retries)|
//! | `results`               | the sink                                     | the sink, the classifier (its cache), ingest (feed shares, retries) |
//! | `callback_attempts`     | the sink                                     | the sink                      |
//! | `feeds`, `feed_rejects` | ingest                                       | the sink, ingest              |
//! | `tenant_usage`          | ingest                                       | ingest                        |
//! | `classifier_partitions`, `classifier_attempts` | the classifier        | the classifier                |
//!
//! The sink's searches and exports build their `WHERE` from a request's filters, so they are the
//! only queries written at run time; they read [`sink::Row`] by its [`sink::COLUMNS`].

use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgPool, PgPoolOptions};

pub mod classifier;
pub mod ingest;
mod settings;
pub mod sink;
pub mod submissions;

pub use settings::{DatabaseSettings, url_without_password};

/// Which schemas a service starts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    /// Only one this version knows every migration of: a sink started against a schema a later
    /// version migrated refuses to start rather than write rows that schema may refuse.
    Known,
    /// One a later version migrated too (its migrations only add what this version does not
    /// use): ingest, whose feeds must not stop while the sinks are upgraded first.
    KnownOrNewer,
}

/// Connects with a pool of at most `connections`, creating the database when it does not exist, and
/// brings the schema up to date. Ingest and the sink both do, so either may start first.
pub async fn connect(url: &str, connections: u32, acquire_timeout: Duration, schema: Schema) -> anyhow::Result<PgPool> {
    if !sqlx::Postgres::database_exists(url).await? {
        // Another service may be creating it at this moment.
        if let Err(e) = sqlx::Postgres::create_database(url).await {
            anyhow::ensure!(sqlx::Postgres::database_exists(url).await?, e);
        }
    }
    let pool = PgPoolOptions::new().max_connections(connections).acquire_timeout(acquire_timeout).connect(url).await?;
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(schema == Schema::KnownOrNewer);
    migrator.run(&pool).await?;
    Ok(pool)
}

/// Whether Postgres refused a statement for the values it holds (a data exception, an integrity
/// or a program-limit violation), as opposed to being unavailable: retrying the same values will
/// fail again, so they must be set aside.
pub fn is_refusal(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| ["22", "23", "54"].iter().any(|class| c.starts_with(class)))
        }
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}

/// A tenant as the tables store it: the default tenant's for records from before tenants.
pub fn tenant_or_default(tenant: Option<&str>) -> &str {
    tenant.unwrap_or(reefline_common::auth::DEFAULT_TENANT)
}
