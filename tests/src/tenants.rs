//! Keys of tenants for the tests that share a stack between survey teams.

use sha2::Digest;

/// A client that presents `key` on every request.
pub fn client_with(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {key}").parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

/// The `API_KEYS_FILE` line giving `key` to `tenant` with `role`.
pub fn key_line(key: &str, tenant: &str, role: &str) -> String {
    format!("{tenant} {role} {}\n", hex::encode(sha2::Sha256::digest(key.as_bytes())))
}

/// A key file giving the keys `(key, tenant, role)`, for ingest and the sink of `settings`.
pub fn key_file(settings: &mut crate::StackSettings, keys: &[(&str, &str, &str)]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("reefline-tenant-keys-{}", uuid::Uuid::now_v7().simple()));
    let text: String = keys.iter().map(|(key, tenant, role)| key_line(key, tenant, role)).collect();
    std::fs::write(&path, text).unwrap();
    settings.ingest.auth.api_keys_file = Some(path.clone());
    settings.sink.auth.api_keys_file = Some(path.clone());
    path
}
