//! An S3 server over a folder for `make bench-feed`: s3s-fs's storage behind s3s's S3 protocol
//! (every request's signature checked), served over HTTP/1.1 with `TCP_NODELAY`.
//!
//! s3s-fs's own binary leaves Nagle's algorithm on and writes a body 4 KB at a time: on loopback
//! each write is below the segment size, so a response waits for the client's delayed ACK (40 ms)
//! in about half of the fetches, and the bench measured that wait rather than Reefline's reads.
//!
//! usage: reefline-s3s-server ACCESS_KEY SECRET_KEY ROOT — listens on 127.0.0.1, a port of the
//! system's choosing, and prints `server is running at http://ADDRESS`.

use hyper_util::rt::TokioIo;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use s3s_fs::FileSystem;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [access_key, secret_key, root] = args.as_slice() else {
        return Err("usage: reefline-s3s-server ACCESS_KEY SECRET_KEY ROOT".into());
    };
    let storage = FileSystem::new(root).map_err(|e| format!("{root}: {e:?}"))?;
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
