//! API keys: when any are configured, the service's API routes require one, given as
//! `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time. Keys are never
//! logged or shown by `Debug`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// Where the API keys come from.
#[derive(Clone, clap::Args)]
pub struct AuthSettings {
    /// API keys accepted, comma-separated. Prefer `API_KEYS_FILE` outside development.
    #[arg(long = "api-keys", env = "API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<SecretString>,

    /// File holding API keys, one per line (blank lines and `#` comments ignored).
    #[arg(long = "api-keys-file", env = "API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("api_keys", &format_args!("<{} redacted>", self.api_keys.len()))
            .field("api_keys_file", &self.api_keys_file)
            .finish()
    }
}

/// The accepted keys; empty means the API is open.
#[derive(Clone, Default)]
pub struct ApiKeys(Arc<Vec<Vec<u8>>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys(<{} redacted>)", self.0.len())
    }
}

impl ApiKeys {
    /// Reads the keys from the settings and the key file.
    pub fn load(settings: &AuthSettings) -> std::io::Result<Self> {
        let mut keys: Vec<String> = settings.api_keys.iter().map(|k| k.expose_secret().trim().to_owned()).collect();
        if let Some(file) = &settings.api_keys_file {
            let text = std::fs::read_to_string(file)?;
            keys.extend(
                text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned),
            );
        }
        keys.retain(|k| !k.is_empty());
        Ok(Self(Arc::new(keys.into_iter().map(String::into_bytes).collect())))
    }

    pub fn from_keys(keys: &[&str]) -> Self {
        Self(Arc::new(keys.iter().map(|k| k.as_bytes().to_vec()).collect()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `given` is one of the keys; every key is compared, each in constant time.
    pub fn accepts(&self, given: &[u8]) -> bool {
        self.0.iter().fold(0u8, |found, key| found | key.as_slice().ct_eq(given).unwrap_u8()) == 1
    }

    /// Logs how the service is protected; call once at start-up.
    pub fn announce(&self, service: &str, addr: std::net::SocketAddr) {
        if self.is_empty() {
            tracing::warn!(%addr, "{service}: no API keys configured, so the API is open to anyone who can reach {addr}; set API_KEYS or API_KEYS_FILE before exposing it");
        } else {
            tracing::info!(keys = self.0.len(), "{service}: API keys required");
        }
    }
}

/// The key a request presents, if any (`Authorization: Bearer` first, else `X-API-Key`).
pub fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.as_bytes();
        return v.strip_prefix(b"Bearer ").or_else(|| v.strip_prefix(b"bearer "));
    }
    headers.get("x-api-key").map(|v| v.as_bytes())
}

/// Middleware: refuses requests without a valid key when keys are configured.
pub async fn require_key(State(keys): State<ApiKeys>, request: Request, next: Next) -> Response {
    if keys.is_empty() || presented(request.headers()).is_some_and(|k| keys.accepts(k)) {
        return next.run(request).await;
    }
    let body = serde_json::json!({"error": {"kind": "unauthorized", "message": "a valid API key is required (Authorization: Bearer <key> or X-API-Key)"}});
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_keys_are_accepted() {
        let keys = ApiKeys::from_keys(&["alpha-key", "beta-key"]);
        assert!(keys.accepts(b"beta-key"));
        assert!(!keys.accepts(b"beta-ke"));
        assert!(!keys.accepts(b""));
        assert!(!ApiKeys::default().accepts(b"anything"));
        assert_eq!(format!("{keys:?}"), "ApiKeys(<2 redacted>)");
    }

    #[test]
    fn keys_come_from_the_setting_and_the_file() {
        let file = std::env::temp_dir().join(format!("reefline-keys-{}", std::process::id()));
        std::fs::write(&file, "# operators\nfile-key\n\n").unwrap();
        let settings = AuthSettings { api_keys: vec!["env-key".into()], api_keys_file: Some(file.clone()) };
        let keys = ApiKeys::load(&settings).unwrap();
        assert!(keys.accepts(b"env-key") && keys.accepts(b"file-key") && !keys.accepts(b"# operators"));
        assert!(!format!("{settings:?}").contains("env-key"));
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn the_key_is_read_from_either_header() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer k1".parse().unwrap());
        assert_eq!(presented(&h), Some(&b"k1"[..]));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "k2".parse().unwrap());
        assert_eq!(presented(&h), Some(&b"k2"[..]));
    }
}
