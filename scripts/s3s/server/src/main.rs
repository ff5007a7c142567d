//! An S3 server over a folder for `make bench-feed`: the s3s project's S3 protocol (every
//! request's signature checked) over the folder's objects held in memory, served over HTTP/1.1
//! with `TCP_NODELAY`.
//!
//! The bench's S3 server shares the pipeline's cores, so its own cost is taken from the figure it
//! helps measure. s3s-fs's storage reads each object twice (once for its MD5) and walks the
//! folder for every listing; its binary leaves Nagle's algorithm on, and on loopback a response
//! written 4 KB at a time then waits for the client's delayed ACK (40 ms) in about half of the
//! fetches. Here a GET answers from memory, a listing from a sorted key list (with continuation
//! tokens, so more than 1,000 keys list), as cheaply as the bench's photo server serves its files.
//!
//! usage: reefline-s3s-server ACCESS_KEY SECRET_KEY ROOT — ROOT/BUCKET/KEY are the objects; listens
//! on 127.0.0.1, a port of the system's choosing, and prints `server is running at http://ADDRESS`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use s3s::auth::SimpleAuth;
use s3s::dto::{
    ETag, GetObjectInput, GetObjectOutput, ListObjectsV2Input, ListObjectsV2Output, Object, StreamingBlob, Timestamp,
};
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};

/// An object: its bytes and what a listing says of it.
struct Stored {
    bytes: Bytes,
    e_tag: String,
    modified: std::time::SystemTime,
}

/// Every bucket's objects, by key in order.
struct Memory(HashMap<String, BTreeMap<String, Stored>>);

impl Memory {
    fn load(root: &Path) -> std::io::Result<Self> {
        let mut buckets = HashMap::new();
        for bucket in std::fs::read_dir(root)? {
            let bucket = bucket?;
            let mut objects = BTreeMap::new();
            let mut folders = vec![bucket.path()];
            while let Some(folder) = folders.pop() {
                for entry in std::fs::read_dir(&folder)? {
                    let entry = entry?;
                    let path = entry.path();
                    if entry.file_type()?.is_dir() {
                        folders.push(path);
                        continue;
                    }
                    let key = path.strip_prefix(bucket.path()).expect("below").to_string_lossy().replace('\\', "/");
                    let bytes = Bytes::from(std::fs::read(&path)?);
                    let e_tag = format!("{:016x}", fxhash(&bytes));
                    objects.insert(key, Stored { bytes, e_tag, modified: entry.metadata()?.modified()? });
                }
            }
            buckets.insert(bucket.file_name().to_string_lossy().into_owned(), objects);
        }
        Ok(Self(buckets))
    }

    fn bucket(&self, name: &str) -> S3Result<&BTreeMap<String, Stored>> {
        self.0.get(name).ok_or_else(|| s3_error!(NoSuchBucket))
    }
}

/// A cheap ETag: FNV-1a over the bytes.
fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

#[async_trait::async_trait]
impl S3 for Memory {
    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        let objects = self.bucket(&input.bucket)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(1000).clamp(1, 1000) as usize;
        // The continuation token is the last key of the page before.
        let after = input.continuation_token.clone().or(input.start_after.clone()).unwrap_or_default();
        let mut page: Vec<Object> = objects
            .range::<String, _>((std::ops::Bound::Excluded(&after), std::ops::Bound::Unbounded))
            .filter(|(key, _)| key.starts_with(&prefix))
            .take(max_keys + 1)
            .map(|(key, stored)| Object {
                key: Some(key.clone()),
                size: Some(stored.bytes.len() as i64),
                e_tag: Some(ETag::Strong(stored.e_tag.clone())),
                last_modified: Some(Timestamp::from(stored.modified)),
                ..Default::default()
            })
            .collect();
        let truncated = page.len() > max_keys;
        page.truncate(max_keys);
        let output = ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: input.prefix,
            max_keys: Some(max_keys as i32),
            key_count: Some(page.len() as i32),
            continuation_token: input.continuation_token,
            is_truncated: Some(truncated),
            next_continuation_token: if truncated { page.last().and_then(|o| o.key.clone()) } else { None },
            contents: Some(page),
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let stored = self.bucket(&input.bucket)?.get(&input.key).ok_or_else(|| s3_error!(NoSuchKey))?;
        let output = GetObjectOutput {
            body: Some(StreamingBlob::from(s3s::Body::from(stored.bytes.clone()))),
            content_length: Some(stored.bytes.len() as i64),
            content_type: Some("image/jpeg".parse().expect("a media type")),
            e_tag: Some(ETag::Strong(stored.e_tag.clone())),
            last_modified: Some(Timestamp::from(stored.modified)),
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [access_key, secret_key, root] = args.as_slice() else {
        return Err("usage: reefline-s3s-server ACCESS_KEY SECRET_KEY ROOT".into());
    };
    let storage = Memory::load(Path::new(root)).map_err(|e| format!("{root}: {e}"))?;
    let mut builder = S3ServiceBuilder::new(storage);
    builder.set_auth(SimpleAuth::from_single(access_key.as_str(), secret_key.as_str()));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("server is running at http://{}", listener.local_addr()?);
    loop {
        let (socket, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        socket.set_nodelay(true)?;
        let service = service.clone();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(socket), service).await;
        });
    }
}
