//! API keys, tenants and roles. When any key is configured, the service's API routes require one,
//! given as `Authorization: Bearer <key>` or `X-API-Key: <key>`. Each key belongs to a tenant (a
//! survey team) and has a role: `read` (its tenant's work), `submit` (submits, and reads its
//! tenant's work) or `admin` (every tenant's work, and operations). Keys are kept only as their
//! SHA-256, compared in constant time, and never logged or shown by `Debug`.
//!
//! The key file (`API_KEYS_FILE`) holds one key a line: `<tenant> <role> <sha256 hex of the key>`
//! (`reefline keys add TENANT ROLE` prints a new key and its line). `API_KEYS` is a shorthand for
//! keys of the default tenant with the `submit` role.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The tenant of everything done without keys, of `API_KEYS`, and of rows written before tenants.
pub const DEFAULT_TENANT: &str = "default";

/// Where the API keys come from.
#[derive(Clone, clap::Args)]
pub struct AuthSettings {
    /// API keys of the default tenant (role `submit`), comma-separated. Prefer `API_KEYS_FILE`.
    #[arg(long = "api-keys", env = "API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<SecretString>,

    /// File of API keys, one a line: `<tenant> <role> <sha256 hex of the key>` (blank lines and
    /// `#` comments ignored; `reefline keys add TENANT ROLE` prints a key and its line).
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

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Submit,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Submit => "submit",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Role::Read),
            "submit" => Ok(Role::Submit),
            "admin" => Ok(Role::Admin),
            other => Err(format!("role `{other}` is not one of read, submit, admin")),
        }
    }
}

/// Whether `name` is a tenant's name: 1 to 63 of `a-z`, `0-9`, `_` and `-`, starting with a letter
/// or digit (it is a metric label and part of the key file's lines).
pub fn is_tenant_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

/// Who is asking: a key's tenant and role, or anyone when the API is open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    pub role: Role,
}

impl Caller {
    /// Anyone, when no key is configured: the default tenant, seeing everything.
    pub fn open() -> Self {
        Self { tenant: DEFAULT_TENANT.to_owned(), role: Role::Admin }
    }

    /// The one tenant whose work the caller sees; `None` for an admin, who sees every tenant's.
    pub fn scope(&self) -> Option<&str> {
        (self.role != Role::Admin).then_some(self.tenant.as_str())
    }

    /// Whether the caller sees `tenant`'s work.
    pub fn sees(&self, tenant: &str) -> bool {
        self.scope().is_none_or(|own| own == tenant)
    }

    pub fn may_submit(&self) -> bool {
        self.role >= Role::Submit
    }
}

/// A route's caller, as [`require_key`] found it. A route that is not behind it refuses everyone
/// rather than guessing.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(unauthorized)
    }
}

/// Why the keys could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("API_KEYS_FILE `{path}` cannot be read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("API_KEYS_FILE `{path}` line {line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
}

#[derive(Clone)]
struct Key {
    tenant: String,
    role: Role,
    sha256: [u8; 32],
}

/// The accepted keys; empty means the API is open.
#[derive(Clone, Default)]
pub struct ApiKeys(Arc<Vec<Key>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys(<{} redacted>)", self.0.len())
    }
}

fn sha256(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// One line of the key file: `<tenant> <role> <sha256 hex>`.
fn parse_line(line: &str) -> Result<Key, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [tenant, role, digest] = fields[..] else {
        return Err(format!(
            "{} fields where `<tenant> <role> <sha256 hex of the key>` has 3 (keys themselves are not stored: \
             `reefline keys add TENANT ROLE` prints a key and its line)",
            fields.len()
        ));
    };
    if !is_tenant_name(tenant) {
        return Err(format!("tenant `{tenant}` is not 1 to 63 of a-z, 0-9, `_` and `-`"));
    }
    let role = role.parse()?;
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(digest, &mut sha256)
        .map_err(|_| format!("`{digest}` is not the 64 hex digits of a SHA-256"))?;
    Ok(Key { tenant: tenant.to_owned(), role, sha256 })
}

impl ApiKeys {
    /// Reads the keys from the settings and the key file.
    pub fn load(settings: &AuthSettings) -> Result<Self, KeysError> {
        let mut keys: Vec<Key> = settings
            .api_keys
            .iter()
            .map(|k| k.expose_secret().trim())
            .filter(|k| !k.is_empty())
            .map(|k| Key { tenant: DEFAULT_TENANT.to_owned(), role: Role::Submit, sha256: sha256(k.as_bytes()) })
            .collect();
        if let Some(path) = &settings.api_keys_file {
            let text =
                std::fs::read_to_string(path).map_err(|source| KeysError::Read { path: path.clone(), source })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let key =
                    parse_line(line).map_err(|reason| KeysError::Line { path: path.clone(), line: i + 1, reason })?;
                keys.push(key);
            }
        }
        Ok(Self(Arc::new(keys)))
    }

    /// Keys given as `(key, tenant, role)`, for tests.
    pub fn from_keys(keys: &[(&str, &str, Role)]) -> Self {
        Self(Arc::new(
            keys.iter()
                .map(|(key, tenant, role)| Key {
                    tenant: (*tenant).to_owned(),
                    role: *role,
                    sha256: sha256(key.as_bytes()),
                })
                .collect(),
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The tenants the keys name, each once, in order.
    pub fn tenants(&self) -> Vec<String> {
        let mut tenants: Vec<String> = self.0.iter().map(|k| k.tenant.clone()).collect();
        tenants.sort();
        tenants.dedup();
        tenants
    }

    /// Who holds `given`, if it is one of the keys; every key is compared, each in constant time.
    pub fn caller(&self, given: &[u8]) -> Option<Caller> {
        let digest = sha256(given);
        let mut found = None;
        for key in self.0.iter() {
            if bool::from(key.sha256.ct_eq(&digest)) {
                found = Some(Caller { tenant: key.tenant.clone(), role: key.role });
            }
        }
        found
    }

    /// Logs how the service is protected; call once at start-up.
    pub fn announce(&self, service: &str, addr: std::net::SocketAddr) {
        if self.is_empty() {
            tracing::warn!(
                %addr,
                "{service}: OPEN MODE: no API keys configured, so anyone who can reach {addr} submits and reads \
                 every result, feed and export as an admin. Fine for a local demo; set API_KEYS_FILE before sharing it"
            );
        } else {
            tracing::info!(keys = self.0.len(), tenants = self.tenants().len(), "{service}: API keys required");
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

fn unauthorized() -> Response {
    let body = serde_json::json!({"error": {"kind": "unauthorized", "message": "a valid API key is required (Authorization: Bearer <key> or X-API-Key)"}});
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], Json(body)).into_response()
}

/// Middleware: refuses requests without a valid key when keys are configured, and tells the
/// routes who is calling ([`Caller`]).
pub async fn require_key(State(keys): State<ApiKeys>, mut request: Request, next: Next) -> Response {
    let caller =
        if keys.is_empty() { Some(Caller::open()) } else { presented(request.headers()).and_then(|k| keys.caller(k)) };
    match caller {
        Some(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        None => unauthorized(),
    }
}

/// The answer to a caller whose role does not allow what it asked.
pub fn forbidden(caller: &Caller, needs: Role) -> Response {
    let message = format!("this key's role is `{}`; `{}` is needed", caller.role.as_str(), needs.as_str());
    let body = serde_json::json!({"error": {"kind": "forbidden", "message": message}});
    (StatusCode::FORBIDDEN, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(key: &str, tenant: &str, role: &str) -> String {
        format!("{tenant} {role} {}", hex::encode(sha256(key.as_bytes())))
    }

    #[test]
    fn a_key_names_its_tenant_and_role() {
        let keys = ApiKeys::from_keys(&[("alpha-key", "reef", Role::Submit), ("beta-key", "kelp", Role::Read)]);
        assert_eq!(keys.caller(b"alpha-key"), Some(Caller { tenant: "reef".into(), role: Role::Submit }));
        assert_eq!(keys.caller(b"beta-key").map(|c| c.role), Some(Role::Read));
        assert_eq!(keys.caller(b"beta-ke"), None);
        assert_eq!(keys.caller(b""), None);
        assert_eq!(ApiKeys::default().caller(b"anything"), None);
        assert_eq!(format!("{keys:?}"), "ApiKeys(<2 redacted>)");
        assert_eq!(keys.tenants(), ["kelp", "reef"]);
    }

    #[test]
    fn keys_come_from_the_setting_and_the_file_of_hashes() {
        let file = std::env::temp_dir().join(format!("reefline-keys-{}", std::process::id()));
        let text =
            format!("# operators\n{}\n\n{}\n", line("file-key", "reef", "admin"), line("reader", "kelp", "read"));
        std::fs::write(&file, text).unwrap();
        let settings = AuthSettings { api_keys: vec!["env-key".into()], api_keys_file: Some(file.clone()) };
        let keys = ApiKeys::load(&settings).unwrap();
        assert_eq!(keys.caller(b"env-key"), Some(Caller { tenant: DEFAULT_TENANT.into(), role: Role::Submit }));
        assert_eq!(keys.caller(b"file-key").map(|c| (c.tenant, c.role)), Some(("reef".into(), Role::Admin)));
        assert_eq!(keys.caller(b"reader").map(|c| c.role), Some(Role::Read));
        assert_eq!(keys.caller(b"# operators"), None);
        assert!(!format!("{settings:?}").contains("env-key"));
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn a_bad_key_file_line_is_named() {
        let file = std::env::temp_dir().join(format!("reefline-bad-keys-{}", std::process::id()));
        for (text, says) in [
            ("plain-old-key\n", "1 fields"),
            ("# c\nReef submit 00\n", "line 2: tenant `Reef`"),
            ("reef owner 00\n", "role `owner`"),
            ("reef read abc\n", "`abc` is not the 64 hex digits"),
        ] {
            std::fs::write(&file, text).unwrap();
            let settings = AuthSettings { api_keys: vec![], api_keys_file: Some(file.clone()) };
            let error = ApiKeys::load(&settings).unwrap_err().to_string();
            assert!(error.contains(says), "{text:?}: {error}");
        }
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn an_admin_sees_every_tenant_and_others_their_own() {
        let admin = Caller { tenant: "ops".into(), role: Role::Admin };
        let reader = Caller { tenant: "reef".into(), role: Role::Read };
        assert_eq!(admin.scope(), None);
        assert!(admin.sees("reef") && admin.may_submit());
        assert_eq!(reader.scope(), Some("reef"));
        assert!(reader.sees("reef") && !reader.sees("kelp") && !reader.may_submit());
        assert_eq!(Caller::open().scope(), None);
        assert!(is_tenant_name("survey-2026_a") && !is_tenant_name("") && !is_tenant_name("-x"));
        assert!(!is_tenant_name("Reef") && !is_tenant_name(&"a".repeat(64)));
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
