//! A small Confluent-compatible Schema Registry for local use and tests.
//!
//! It implements the REST calls `schema_registry_converter` makes — register, look up by id,
//! subject versions, lookup under a subject, compatibility config and checks — with the BACKWARD
//! check (a new version must read data written with the latest) answering 409 when it fails.
//! State is kept in a JSON file, rewritten atomically and synced before a change is answered, so
//! ids survive restarts and crashes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Clone, Default, Serialize, Deserialize)]
struct Store {
    /// Schema text by id; ids start at 1.
    schemas: BTreeMap<u32, String>,
    /// Ids of each subject's versions, version n at index n-1.
    subjects: BTreeMap<String, Vec<u32>>,
    /// Compatibility level: "" is the global one.
    config: BTreeMap<String, String>,
}

impl Store {
    fn level(&self, subject: &str) -> &str {
        self.config.get(subject).or_else(|| self.config.get("")).map(String::as_str).unwrap_or("BACKWARD")
    }
}

/// The registry's shared state: the store and, if persistent, its file.
#[derive(Clone)]
pub struct Registry {
    store: Arc<Mutex<Store>>,
    file: Option<PathBuf>,
}

impl Registry {
    /// A registry kept in memory only.
    pub fn in_memory() -> Self {
        Self { store: Arc::default(), file: None }
    }

    /// A registry persisted in `file`, loading what is already there.
    pub fn open(file: PathBuf) -> anyhow::Result<Self> {
        let store = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Store::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(Self { store: Arc::new(Mutex::new(store)), file: Some(file) })
    }

    /// Makes `next` the registry's state: on disk first (written to a temporary file, synced,
    /// renamed over the old one, and the folder synced, so a crash leaves the old state or the
    /// new one), and only then in memory, so nothing is answered that a restart would forget.
    async fn commit(&self, store: &mut Store, next: Store) -> Result<(), ApiError> {
        if let Some(file) = self.file.clone() {
            let bytes = serde_json::to_vec_pretty(&next).map_err(|e| ApiError::internal(e.to_string()))?;
            tokio::task::spawn_blocking(move || write_durably(&file, &bytes))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| ApiError::internal(format!("could not save the registry: {e}")))?;
        }
        *store = next;
        Ok(())
    }

    /// The REST routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/subjects", get(list_subjects))
            .route("/subjects/{subject}", post(lookup))
            .route("/subjects/{subject}/versions", get(list_versions).post(register))
            .route("/subjects/{subject}/versions/{version}", get(get_version))
            .route("/schemas/ids/{id}", get(get_by_id))
            .route("/config", get(get_global_config).put(put_global_config))
            .route("/config/{subject}", get(get_config).put(put_config))
            .route("/compatibility/subjects/{subject}/versions", post(check_latest))
            .route("/compatibility/subjects/{subject}/versions/{version}", post(check_version))
            .with_state(self)
    }
}

fn write_durably(file: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = file.with_extension("tmp");
    let mut out = std::fs::File::create(&tmp)?;
    out.write_all(bytes)?;
    out.sync_all()?;
    std::fs::rename(&tmp, file)?;
    let folder = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::File::open(folder)?.sync_all()
}

/// An error in the registry's JSON shape: `{"error_code": 40401, "message": "..."}`.
struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    fn internal(message: String) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, 50001, message)
    }
    fn subject_not_found(subject: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found."))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error_code": self.code, "message": self.message}))).into_response()
    }
}

#[derive(Deserialize)]
struct SchemaBody {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
}

fn parse(body: &SchemaBody) -> Result<Schema, ApiError> {
    if let Some(t) = body.schema_type.as_deref().filter(|t| *t != "AVRO") {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("schemaType {t} is not supported; only AVRO"),
        ));
    }
    Schema::parse_str(&body.schema)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, 42201, format!("Invalid schema: {e}")))
}

fn canonical(text: &str) -> Option<String> {
    Schema::parse_str(text).ok().map(|s| s.canonical_form())
}

/// Whether `new` may follow `old` under `level`.
fn compatible(level: &str, old: &Schema, new: &Schema) -> bool {
    let backward = || SchemaCompatibility::can_read(old, new).is_ok();
    let forward = || SchemaCompatibility::can_read(new, old).is_ok();
    match level.trim_end_matches("_TRANSITIVE") {
        "NONE" => true,
        "FORWARD" => forward(),
        "FULL" => backward() && forward(),
        _ => backward(),
    }
}

fn version_entry(store: &Store, subject: &str, version: &str) -> Result<(u32, u32), ApiError> {
    let ids = store.subjects.get(subject).ok_or_else(|| ApiError::subject_not_found(subject))?;
    let n = if version == "latest" || version == "-1" {
        ids.len() as u32
    } else {
        version.parse().map_err(|_| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, 42202, format!("Invalid version `{version}`"))
        })?
    };
    let id = n.checked_sub(1).and_then(|i| ids.get(i as usize)).copied();
    id.map(|id| (n, id))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, 40402, format!("Version {version} not found.")))
}

async fn register(
    State(reg): State<Registry>,
    Path(subject): Path<String>,
    Json(body): Json<SchemaBody>,
) -> Result<Json<Value>, ApiError> {
    let schema = parse(&body)?;
    let form = schema.canonical_form();
    let mut store = reg.store.lock().await;
    let versions = store.subjects.get(&subject).cloned().unwrap_or_default();
    if let Some(id) = versions.iter().find(|id| canonical(&store.schemas[id]).as_deref() == Some(&form)) {
        return Ok(Json(json!({"id": id})));
    }
    let level = store.level(&subject).to_owned();
    let to_check: Vec<u32> =
        if level.ends_with("_TRANSITIVE") { versions.clone() } else { versions.last().copied().into_iter().collect() };
    for id in to_check {
        let old = Schema::parse_str(&store.schemas[&id]).map_err(|e| ApiError::internal(e.to_string()))?;
        if !compatible(&level, &old, &schema) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                409,
                format!(
                    "Schema being registered is incompatible with an earlier schema for subject \"{subject}\" ({level})"
                ),
            ));
        }
    }
    let existing = store.schemas.iter().find(|(_, text)| canonical(text).as_deref() == Some(&form)).map(|(id, _)| *id);
    let id = existing.unwrap_or_else(|| store.schemas.keys().next_back().map_or(1, |last| last + 1));
    let mut next = store.clone();
    next.schemas.entry(id).or_insert(body.schema);
    next.subjects.entry(subject).or_default().push(id);
    reg.commit(&mut store, next).await?;
    Ok(Json(json!({"id": id})))
}

async fn lookup(
    State(reg): State<Registry>,
    Path(subject): Path<String>,
    Json(body): Json<SchemaBody>,
) -> Result<Json<Value>, ApiError> {
    let form = parse(&body)?.canonical_form();
    let store = reg.store.lock().await;
    let ids = store.subjects.get(&subject).ok_or_else(|| ApiError::subject_not_found(&subject))?;
    let (i, id) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| canonical(&store.schemas[id]).as_deref() == Some(&form))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, 40403, "Schema not found"))?;
    Ok(Json(json!({"subject": subject, "id": id, "version": i + 1, "schema": store.schemas[id]})))
}

async fn list_subjects(State(reg): State<Registry>) -> Json<Vec<String>> {
    Json(reg.store.lock().await.subjects.keys().cloned().collect())
}

async fn list_versions(State(reg): State<Registry>, Path(subject): Path<String>) -> Result<Json<Vec<u32>>, ApiError> {
    let store = reg.store.lock().await;
    let ids = store.subjects.get(&subject).ok_or_else(|| ApiError::subject_not_found(&subject))?;
    Ok(Json((1..=ids.len() as u32).collect()))
}

async fn get_version(
    State(reg): State<Registry>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let store = reg.store.lock().await;
    let (n, id) = version_entry(&store, &subject, &version)?;
    Ok(Json(json!({"subject": subject, "version": n, "id": id, "schema": store.schemas[&id]})))
}

async fn get_by_id(State(reg): State<Registry>, Path(id): Path<u32>) -> Result<Json<Value>, ApiError> {
    let store = reg.store.lock().await;
    let schema =
        store.schemas.get(&id).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, 40403, "Schema not found"))?;
    Ok(Json(json!({"schema": schema})))
}

#[derive(Deserialize)]
struct ConfigBody {
    compatibility: String,
}

const LEVELS: [&str; 7] =
    ["NONE", "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE"];

async fn set_config(reg: &Registry, key: String, body: ConfigBody) -> Result<Json<Value>, ApiError> {
    if !LEVELS.contains(&body.compatibility.as_str()) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            format!("Invalid compatibility level `{}`", body.compatibility),
        ));
    }
    let mut store = reg.store.lock().await;
    let mut next = store.clone();
    next.config.insert(key, body.compatibility.clone());
    reg.commit(&mut store, next).await?;
    Ok(Json(json!({"compatibility": body.compatibility})))
}

async fn get_global_config(State(reg): State<Registry>) -> Json<Value> {
    Json(json!({"compatibilityLevel": reg.store.lock().await.level("")}))
}

async fn put_global_config(State(reg): State<Registry>, Json(body): Json<ConfigBody>) -> Result<Json<Value>, ApiError> {
    set_config(&reg, String::new(), body).await
}

async fn get_config(State(reg): State<Registry>, Path(subject): Path<String>) -> Json<Value> {
    Json(json!({"compatibilityLevel": reg.store.lock().await.level(&subject)}))
}

async fn put_config(
    State(reg): State<Registry>,
    Path(subject): Path<String>,
    Json(body): Json<ConfigBody>,
) -> Result<Json<Value>, ApiError> {
    set_config(&reg, subject, body).await
}

async fn check(reg: &Registry, subject: &str, version: &str, body: &SchemaBody) -> Result<Json<Value>, ApiError> {
    let schema = parse(body)?;
    let store = reg.store.lock().await;
    if !store.subjects.contains_key(subject) {
        return Ok(Json(json!({"is_compatible": true})));
    }
    let (_, id) = version_entry(&store, subject, version)?;
    let old = Schema::parse_str(&store.schemas[&id]).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({"is_compatible": compatible(store.level(subject), &old, &schema)})))
}

async fn check_latest(
    State(reg): State<Registry>,
    Path(subject): Path<String>,
    Json(body): Json<SchemaBody>,
) -> Result<Json<Value>, ApiError> {
    check(&reg, &subject, "latest", &body).await
}

async fn check_version(
    State(reg): State<Registry>,
    Path((subject, version)): Path<(String, String)>,
    Json(body): Json<SchemaBody>,
) -> Result<Json<Value>, ApiError> {
    check(&reg, &subject, &version, &body).await
}
