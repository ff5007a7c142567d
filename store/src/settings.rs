//! Where the database is: one setting, `DATABASE_URL`, that every service flattens into its own.

use secrecy::{ExposeSecret, SecretString};

/// Reefline's database.
#[derive(Clone, clap::Args)]
pub struct DatabaseSettings {
    /// Postgres URL of Reefline's database. Ingest and the sink create and migrate it at start-up
    /// (ingest's feeds answer 503 until it is reached); the classifier's result cache and delivery
    /// ledger use it, and a database that does not answer costs the classifier only those.
    #[arg(
        id = "database_url",
        long = "database-url",
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/reefline",
        hide_env_values = true
    )]
    pub url: SecretString,
}

impl DatabaseSettings {
    /// The URL, password and all, for connecting.
    pub fn url(&self) -> &str {
        self.url.expose_secret()
    }
}

impl From<&str> for DatabaseSettings {
    fn from(url: &str) -> Self {
        Self { url: url.into() }
    }
}

impl From<String> for DatabaseSettings {
    fn from(url: String) -> Self {
        Self { url: url.into() }
    }
}

/// The URL without its password: what logs and `Debug` show.
impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings").field("url", &url_without_password(self.url())).finish()
    }
}

/// The database URL with any password replaced, for logs; a URL that does not parse is not shown
/// at all (it may still hold one).
pub fn url_without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.into()
        }
        Err(_) => "<unparsable>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_whatever_they_hold() {
        for (url, shown) in [
            ("postgres://reef:p%40ss@db:5432/reefline", "postgres://reef:***@db:5432/reefline"),
            ("postgres://reef:p@ss@db/reefline", "postgres://reef:***@db/reefline"),
            ("postgres://reef@db/reefline", "postgres://reef@db/reefline"),
            ("not a url: hunter2", "<unparsable>"),
        ] {
            assert_eq!(url_without_password(url), shown, "{url}");
            assert!(format!("{:?}", DatabaseSettings::from(url)).contains(shown));
        }
    }
}
