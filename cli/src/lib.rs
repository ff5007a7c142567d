//! `reefline`: a survey operator's command line over the HTTP API. `submit` uploads a feed (CSV,
//! NDJSON or a URL a line, gzipped or not) and, with `--wait`, follows it with a progress bar until
//! every image has a result; `status`, `export` and `retry` take a feed's (or a batch's) id; `export -o`
//! writes its file whole or not at all. `keys add TENANT ROLE` makes a new API key and the line of
//! the services' `API_KEYS_FILE` that admits it.
//!
//! The API key is never a command-line argument (anyone on the machine reads those in `ps`): it comes
//! from `REEFLINE_API_KEY`, or from the first line of the file `--api-key-file` (or
//! `REEFLINE_API_KEY_FILE`) names, which wins when both are given.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::{Digest, Sha256};

mod client;
mod partial;

use client::Client;

/// The environment variable that holds the API key.
const KEY_ENV: &str = "REEFLINE_API_KEY";

/// Where the services are, and where the key to show them is.
#[derive(Args, Debug)]
struct Api {
    /// Ingest's base URL (submissions and retries).
    #[arg(long, env = "REEFLINE_INGEST_URL", default_value = "http://127.0.0.1:8080", global = true)]
    ingest_url: String,

    /// The sink's base URL (progress and exports).
    #[arg(long, env = "REEFLINE_SINK_URL", default_value = "http://127.0.0.1:8081", global = true)]
    sink_url: String,

    /// A file whose first line is the API key (else the key is `REEFLINE_API_KEY`'s, if set).
    #[arg(long, env = "REEFLINE_API_KEY_FILE", global = true)]
    api_key_file: Option<PathBuf>,
}

#[derive(Parser, Debug)]
#[command(name = "reefline", version, about = "Classify a survey's photos with Reefline, over its HTTP API")]
struct Cli {
    #[command(flatten)]
    api: Api,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Upload a feed of image URLs (a file, or - for standard input), or feed a bucket's prefix
    /// (`s3://bucket/prefix/`, `az://container/prefix/`), and print its id and counts.
    Submit {
        /// The feed: a CSV with a `url` column, NDJSON, or a URL a line; `.gz` or not. Or a
        /// bucket's or container's prefix, `s3://bucket/prefix/` or `az://container/prefix/`: its image objects, listed by ingest.
        file: String,
        /// With a prefix: the glob its objects' keys must match below it (`**/*.jpg`); else every
        /// JPEG, PNG, GIF, WebP and BMP.
        #[arg(long = "match")]
        pattern: Option<String>,
        /// csv, ndjson or text; else from the file name, else guessed from the first line.
        #[arg(long)]
        format: Option<String>,
        /// The model for every image (a name of the manifest).
        #[arg(long)]
        model: Option<String>,
        /// Names the feed: sending again with the same key resumes it, never duplicating. A file's
        /// upload that breaks off is resent with one on its own.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Where the sink POSTs the feed's signed summary once every image has a result.
        #[arg(long)]
        callback_url: Option<String>,
        /// Follow the feed with a progress bar until every image has a result.
        #[arg(long)]
        wait: bool,
    },
    /// Show a feed's (or a batch's) progress.
    Status { id: String },
    /// Write every result of a feed (or a batch), or with no id, every result a search finds
    /// (`--label`, `--since`, `--until` and the filters below, across feeds and batches).
    Export {
        id: Option<String>,
        /// csv, ndjson, megadetector, coco-camera-traps or camtrap-dp (a ZIP).
        #[arg(long, default_value = "csv")]
        format: String,
        /// megadetector: the prefix of the image URLs its `file`s leave out (Timelapse reads paths
        /// relative to the image folder), e.g. s3://reef-survey/survey-2026/.
        #[arg(long)]
        relative_to: Option<String>,
        /// camtrap-dp: the cameras' UTC offset, for times given without one (EXIF times), e.g. +10:00.
        #[arg(long, allow_hyphen_values = true)]
        utc_offset: Option<String>,
        /// camtrap-dp: the latitude of deployments whose images give no coordinates.
        #[arg(long, allow_hyphen_values = true)]
        latitude: Option<f64>,
        /// camtrap-dp: the longitude of deployments whose images give no coordinates.
        #[arg(long, allow_hyphen_values = true)]
        longitude: Option<f64>,
        /// camtrap-dp: the project's sampling design (opportunistic unless given).
        #[arg(long)]
        sampling_design: Option<String>,
        /// Where to write it; standard output when absent.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Only `ok` or `error` results.
        #[arg(long)]
        status: Option<String>,
        /// Only images whose top class is (true) or is not (false) a marine animal.
        #[arg(long)]
        marine: Option<bool>,
        /// Only this marine group (shark, ray, ...).
        #[arg(long)]
        group: Option<String>,
        /// Only images whose top score is at least this.
        #[arg(long)]
        min_score: Option<f64>,
        /// A search: only images whose top class is this label (any case).
        #[arg(long, conflicts_with = "id")]
        label: Option<String>,
        /// A search: only results completed at or after this time (RFC 3339).
        #[arg(long, conflicts_with = "id")]
        since: Option<String>,
        /// A search: only results completed before this time (RFC 3339).
        #[arg(long, conflicts_with = "id")]
        until: Option<String>,
    },
    /// Send the images that failed transiently (timeouts, 429, 5xx) through again.
    Retry { id: String },
    /// Make API keys for the services' `API_KEYS_FILE`.
    Keys {
        #[command(subcommand)]
        command: Keys,
    },
}

#[derive(Subcommand, Debug)]
enum Keys {
    /// Print a new key, then the line to append to the API keys file (`<tenant> <role> <sha256 of the key>`).
    Add {
        /// The tenant the key belongs to: a-z, 0-9, `_` and `-`, starting with a letter or digit, at most 63.
        #[arg(value_parser = tenant)]
        tenant: String,
        /// What the key may do.
        role: Role,
    },
}

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Role {
    /// Read its tenant's work.
    Read,
    /// Submit and read its tenant's work.
    Submit,
    /// Every tenant's work, and operations such as replay.
    Admin,
}

/// Parses the command line and runs the command.
pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Keys { command: Keys::Add { tenant, role } } = &cli.command {
        let (key, line) = new_key(tenant, *role)?;
        println!("{}\n{line}", key.expose_secret());
        return Ok(());
    }
    let key = api_key(cli.api.api_key_file.as_deref(), std::env::var(KEY_ENV).ok())?;
    let client = Client::new(cli.api, key)?;
    match cli.command {
        Command::Submit { file, pattern, format, model, idempotency_key, callback_url, wait } => {
            let feed = if file.starts_with("s3://") || file.starts_with("az://") {
                client.submit_prefix(&file, pattern, model, callback_url, idempotency_key).await?
            } else {
                anyhow::ensure!(
                    pattern.is_none(),
                    "--match selects the objects of an s3:// or az:// prefix; {file} is a file"
                );
                client.submit(&file, format, model, callback_url, idempotency_key).await?
            };
            let id = feed["feed_id"].as_str().context("no feed_id in the answer")?.to_owned();
            print_json(&feed)?;
            if wait {
                let progress = client.follow(&id).await?;
                print_json(&progress)?;
            }
        }
        Command::Status { id } => print_json(&client.status(&id).await?)?,
        Command::Export {
            id,
            format,
            relative_to,
            utc_offset,
            latitude,
            longitude,
            sampling_design,
            output,
            status,
            marine,
            group,
            min_score,
            label,
            since,
            until,
        } => {
            let mut query = vec![("format", format)];
            query.extend(relative_to.map(|r| ("relative_to", r)));
            query.extend(utc_offset.map(|o| ("utc_offset", o)));
            query.extend(latitude.map(|l| ("latitude", l.to_string())));
            query.extend(longitude.map(|l| ("longitude", l.to_string())));
            query.extend(sampling_design.map(|d| ("sampling_design", d)));
            query.extend(status.map(|s| ("status", s)));
            query.extend(marine.map(|m| ("marine", m.to_string())));
            query.extend(group.map(|g| ("group", g)));
            query.extend(min_score.map(|s| ("min_score", s.to_string())));
            query.extend(label.map(|l| ("label", l)));
            query.extend(since.map(|s| ("since", s)));
            query.extend(until.map(|u| ("until", u)));
            client.export(id.as_deref(), &query, output).await?;
        }
        Command::Retry { id } => print_json(&client.retry(&id).await?)?,
        Command::Keys { .. } => unreachable!("answered above, without a key"),
    }
    Ok(())
}

/// The API key: the first line of `file` when one is named, else `from_env`; none is fine (open mode).
fn api_key(file: Option<&Path>, from_env: Option<String>) -> anyhow::Result<Option<SecretString>> {
    let Some(file) = file else {
        let key = from_env.map(|key| SecretString::from(key.trim()));
        return Ok(key.filter(|key| !key.expose_secret().is_empty()));
    };
    let text = SecretString::from(
        std::fs::read_to_string(file).with_context(|| format!("reading the API key from {}", file.display()))?,
    );
    let key = text.expose_secret().lines().next().unwrap_or_default().trim();
    if key.is_empty() {
        bail!("{} holds no API key on its first line", file.display());
    }
    Ok(Some(key.into()))
}

/// A tenant's name, as the API keys file takes it: `^[a-z0-9][a-z0-9_-]{0,62}$`.
fn tenant(name: &str) -> Result<String, String> {
    let fits = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = match name.as_bytes() {
        [first, rest @ ..] => {
            fits(*first) && rest.len() <= 62 && rest.iter().all(|&c| fits(c) || c == b'_' || c == b'-')
        }
        [] => false,
    };
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!("`{name}` is not a tenant name: a-z, 0-9, `_` and `-`, starting with a letter or digit, 1-63 long"))
    }
}

/// A new API key (`rk_` and 32 bytes of the OS random source, in hex) and its line of the API keys
/// file: `<tenant> <role> <sha256 hex of the key>`; the key itself is stored nowhere.
fn new_key(tenant: &str, role: Role) -> anyhow::Result<(SecretString, String)> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow!("the OS random source failed: {e}"))?;
    let key = format!("rk_{}", hex::encode(bytes));
    let role = role.to_possible_value().expect("no role is skipped");
    let line = format!("{tenant} {} {}", role.get_name(), hex::encode(Sha256::digest(key.as_bytes())));
    Ok((key.into(), line))
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::format_of;
    use crate::partial::Partial;

    #[test]
    fn file_names_say_their_format() {
        assert_eq!(format_of("survey/photos.CSV.gz").as_deref(), Some("csv"));
        assert_eq!(format_of("urls.txt").as_deref(), Some("text"));
        assert_eq!(format_of("-"), None);
    }

    #[test]
    fn the_command_line_parses() {
        let cli =
            Cli::try_parse_from(["reefline", "export", "abc", "--format", "megadetector", "-o", "out.json"]).unwrap();
        assert!(matches!(cli.command, Command::Export { ref format, .. } if format == "megadetector"));
        let search =
            Cli::try_parse_from(["reefline", "export", "--label", "tiger shark", "--since", "2026-11-01T00:00:00Z"]);
        assert!(
            matches!(search.unwrap().command, Command::Export { id: None, label: Some(ref l), .. } if l == "tiger shark")
        );
        assert!(
            Cli::try_parse_from(["reefline", "export", "abc", "--label", "tiger shark"]).is_err(),
            "a feed or a search"
        );
        assert!(Cli::try_parse_from(["reefline", "frobnicate"]).is_err());
        let key_on_the_command_line = Cli::try_parse_from(["reefline", "status", "abc", "--api-key", "secret"]);
        assert!(key_on_the_command_line.is_err(), "a key in argv is readable by anyone, in `ps`");
    }

    /// A directory of its own for one test, empty.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("reefline-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_key_comes_from_a_file_or_the_environment() {
        let dir = scratch("key");
        let file = dir.join("key");
        std::fs::write(&file, "  rk_fromfile \nsecond line\n").unwrap();
        let key = |file: Option<&Path>, env: Option<&str>| {
            api_key(file, env.map(String::from)).map(|k| k.map(|k| k.expose_secret().to_owned()))
        };
        assert_eq!(key(Some(&file), Some("rk_fromenv")).unwrap().as_deref(), Some("rk_fromfile"));
        assert_eq!(key(None, Some("rk_fromenv")).unwrap().as_deref(), Some("rk_fromenv"));
        assert_eq!(key(None, None).unwrap(), None);
        let missing = key(Some(&dir.join("absent")), None).unwrap_err();
        assert!(format!("{missing:#}").contains("reading the API key from"), "{missing:#}");
        std::fs::write(&file, "\n").unwrap();
        assert!(key(Some(&file), None).unwrap_err().to_string().contains("holds no API key"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_new_keys_line_holds_the_hash_of_the_key() {
        let cli = Cli::try_parse_from(["reefline", "keys", "add", "reef-4_north", "submit"]).unwrap();
        let Command::Keys { command: Keys::Add { tenant, role } } = cli.command else { panic!("{:?}", cli.command) };
        let (key, line) = new_key(&tenant, role).unwrap();
        let key = key.expose_secret();
        let hex = key.strip_prefix("rk_").expect("keys start rk_");
        assert!(hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{key}");
        let hash = hex::encode(Sha256::digest(key.as_bytes()));
        assert_eq!(line, format!("reef-4_north submit {hash}"));
        assert_ne!(new_key("a", Role::Read).unwrap().0.expose_secret(), key, "each key is new");
    }

    #[test]
    fn a_bad_tenant_or_role_is_refused() {
        for tenant in ["", "Reef", "-reef", "_reef", "reef 4", "reef/4", "récif", &"a".repeat(64)] {
            assert!(Cli::try_parse_from(["reefline", "keys", "add", tenant, "read"]).is_err(), "tenant `{tenant}`");
        }
        assert!(Cli::try_parse_from(["reefline", "keys", "add", &"a".repeat(63), "admin"]).is_ok());
        for role in ["", "owner", "Admin", "read,submit"] {
            assert!(Cli::try_parse_from(["reefline", "keys", "add", "reef", role]).is_err(), "role `{role}`");
        }
    }

    #[test]
    fn an_export_that_breaks_off_leaves_the_old_file_as_it_was() {
        let dir = scratch("partial");
        let path = dir.join("survey.csv");
        std::fs::write(&path, "old").unwrap();
        let broken = || -> anyhow::Result<()> {
            let mut out = Partial::create(&path)?;
            out.write_all(b"url,line\nhttps://a/1.jpg")?;
            bail!("the connection broke")
        };
        assert!(broken().is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        let names = |dir: &Path| {
            let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            names
        };
        assert_eq!(names(&dir), ["survey.csv"], "no temporary file is left");

        let mut out = Partial::create(&path).unwrap();
        out.write_all(b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old", "nothing shows before the commit");
        out.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(names(&dir), ["survey.csv"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
