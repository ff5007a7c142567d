//! Serving an HTTP API with the limits a public service needs: a connection gets a bounded time
//! to send its first request's headers (one that sends nothing, or trickles them, is cut off),
//! a bounded idle time between requests, a request a bounded time to be answered (then `408`),
//! only so many connections are open and only so many requests handled at once (the rest wait
//! their turn). The probes (`/healthz`, `/readyz`, `/metrics`) never wait behind that request
//! limit: an orchestrator must not restart a busy but healthy service. `axum::serve` sets none of
//! these.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt;
use tracing::Instrument;

/// Limits on what one client can hold of an HTTP server.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct HttpLimits {
    /// Longest a client may take to send a request's headers, in seconds, counted for the first
    /// request from when it connects (one that sends nothing is closed too); the connection is then closed.
    #[arg(long = "http-header-timeout-s", env = "HTTP_HEADER_TIMEOUT_S", default_value_t = 10)]
    pub header_timeout_s: u64,

    /// Longest a connection may stay open with no request in progress, in seconds; then it is
    /// closed. (An HTTP/1 connection waits at most the header timeout for its next request.)
    #[arg(long = "http-idle-timeout-s", env = "HTTP_IDLE_TIMEOUT_S", default_value_t = 60)]
    pub idle_timeout_s: u64,

    /// Longest a request may take to be answered, its body included, in seconds; then `408`.
    #[arg(long = "http-request-timeout-s", env = "HTTP_REQUEST_TIMEOUT_S", default_value_t = 90)]
    pub request_timeout_s: u64,

    /// Requests handled at once; more wait for a turn (within their request timeout). The probes
    /// (`/healthz`, `/readyz`, `/metrics`) are not counted and never wait.
    #[arg(long = "http-max-concurrent", env = "HTTP_MAX_CONCURRENT", default_value_t = 1024)]
    pub max_concurrent: usize,

    /// Connections open at once, so that idle clients cannot take every file descriptor; more
    /// wait in the listen backlog until one closes.
    #[arg(long = "http-max-connections", env = "HTTP_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout_s: 10,
            idle_timeout_s: 60,
            request_timeout_s: 90,
            max_concurrent: 1024,
            max_connections: 4096,
        }
    }
}

/// How long a stopping server lets requests in progress finish.
const DRAIN: Duration = Duration::from_secs(10);

/// The routes an orchestrator and a scraper poll, served outside the request limit.
const PROBES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Serves `router` on `listener` within `limits` until `shutdown` resolves; then stops accepting,
/// lets the requests in progress finish (for at most 10 s) and returns.
pub async fn serve(listener: TcpListener, router: Router, limits: HttpLimits, shutdown: impl Future<Output = ()>) {
    serve_with_streaming(listener, router, Router::new(), limits, shutdown).await;
}

/// As [`serve`], with `streaming` routes besides: uploads and downloads that last as long as
/// their data does, exempt from the request timeout (they bound their own idle time) but not from
/// the header timeout or the concurrency limit.
pub async fn serve_with_streaming(
    listener: TcpListener,
    router: Router,
    streaming: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let app = App::new(router, streaming, &limits);
    let times = Times {
        header: Duration::from_secs(limits.header_timeout_s.max(1)),
        idle: Duration::from_secs(limits.idle_timeout_s.max(1)),
    };
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(times.header);
    // Pings find a peer that vanished while a stream was open; the watchdog closes idle ones.
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(times.idle).keep_alive_timeout(times.header);
    let builder = Arc::new(builder);
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, place) = tokio::select! {
            accepted = accept(&listener, &places) => accepted,
            () = &mut shutdown => break,
        };
        let connection = Connection { builder: builder.clone(), app: app.clone(), times, stopping: stopping.clone() };
        tokio::spawn(connection.serve(stream, place));
    }
    drop(listener);
    stop.send_replace(true);
    // Every connection holds a receiver until it ends.
    drop(stopping);
    if tokio::time::timeout(DRAIN, stop.closed()).await.is_err() {
        tracing::warn!("requests still in progress after {DRAIN:?}; stopping anyway");
    }
}

/// The next connection, once there is a place for it: at the limit, new connections wait in the
/// listen backlog rather than take a file descriptor each.
async fn accept(listener: &TcpListener, places: &Arc<Semaphore>) -> (TcpStream, OwnedSemaphorePermit) {
    let place = places.clone().acquire_owned().await.expect("the connection semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return (stream, place),
            Err(e) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The routes as served: the probes on their own, everything else within the request limit.
#[derive(Clone)]
struct App {
    limited: Router,
    probes: Router,
}

impl App {
    fn new(router: Router, streaming: Router, limits: &HttpLimits) -> Self {
        let answered = router.layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(limits.request_timeout_s),
        ));
        let limited = answered
            .clone()
            .merge(streaming)
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(limits.max_concurrent.max(1)));
        Self { limited, probes: answered }
    }

    async fn answer(self, request: Request<Body>) -> Response<Body> {
        if PROBES.contains(&request.uri().path()) {
            return Self::route(self.probes, request).await;
        }
        // The request's span, in the caller's trace when it sent one: the handler's spans are
        // its children, and so are the records it produces.
        let span = tracing::info_span!("http", method = %request.method(), path = %request.uri().path());
        crate::telemetry::continue_from_http(&span, request.headers());
        Self::route(self.limited, request).instrument(span).await
    }

    async fn route(router: Router, request: Request<Body>) -> Response<Body> {
        match router.oneshot(request).await {
            Ok(response) => response,
            Err(infallible) => match infallible {},
        }
    }
}

/// How long a connection may wait for its first request, and between requests.
#[derive(Clone, Copy)]
struct Times {
    header: Duration,
    idle: Duration,
}

/// One accepted connection and what it is served with.
struct Connection {
    builder: Arc<Builder<TokioExecutor>>,
    app: App,
    times: Times,
    /// Turns true when the server stops.
    stopping: watch::Receiver<bool>,
}

/// Why a connection's watchdog ended it.
enum Expired {
    /// No request's headers within the header timeout (not even the protocol's preface, perhaps).
    Silent,
    /// No request in progress for the idle timeout.
    Idle,
}

impl Connection {
    /// Serves the connection until it ends, its watchdog ends it, or the server stops; `_place`
    /// is its place among the open connections, given back after its socket is closed.
    async fn serve(mut self, stream: TcpStream, _place: OwnedSemaphorePermit) {
        let (requests, seen) = watch::channel(Requests::default());
        let requests = Arc::new(requests);
        let app = self.app;
        let service = tower::service_fn(move |request: Request<Incoming>| {
            let open = Open::new(requests.clone());
            let answer = app.clone().answer(request.map(Body::new));
            async move { Ok::<_, Infallible>(answer.await.map(|body| Tracked { body, _open: open })) }
        });
        let connection =
            self.builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service));
        tokio::pin!(connection);
        let ended = tokio::select! {
            ended = connection.as_mut() => Some(ended),
            expired = watchdog(seen, self.times) => match expired {
                Expired::Silent => {
                    tracing::debug!("closing a connection that sent no request in time");
                    return;
                }
                Expired::Idle => None,
            },
            _ = self.stopping.wait_for(|stop| *stop) => None,
        };
        let ended = match ended {
            Some(ended) => ended,
            None => {
                connection.as_mut().graceful_shutdown();
                match tokio::time::timeout(DRAIN, connection).await {
                    Ok(ended) => ended,
                    Err(_) => return,
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// What a connection's watchdog knows of its requests.
#[derive(Default)]
struct Requests {
    /// Whether a request's headers have arrived.
    started: bool,
    /// Requests whose response has not been sent in full.
    open: usize,
}

/// Resolves when the connection should end: no first request within the header timeout, or no
/// request in progress for the idle timeout.
async fn watchdog(mut requests: watch::Receiver<Requests>, times: Times) -> Expired {
    let first = tokio::time::timeout(times.header, requests.wait_for(|r| r.started)).await.map(|seen| seen.is_ok());
    match first {
        Err(_) => return Expired::Silent,
        Ok(false) => return std::future::pending().await,
        Ok(true) => {}
    }
    loop {
        let idle = requests.borrow_and_update().open == 0;
        let changed = requests.changed();
        let changed = if idle {
            match tokio::time::timeout(times.idle, changed).await {
                Ok(changed) => changed,
                Err(_) => return Expired::Idle,
            }
        } else {
            changed.await
        };
        if changed.is_err() {
            // The connection is ending on its own.
            return std::future::pending().await;
        }
    }
}

/// One request in progress on a connection, from its headers to the end of its response.
struct Open(Arc<watch::Sender<Requests>>);

impl Open {
    fn new(requests: Arc<watch::Sender<Requests>>) -> Self {
        requests.send_modify(|r| {
            r.started = true;
            r.open += 1;
        });
        Self(requests)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|r| r.open -= 1);
    }
}

/// A response body that keeps its request open until it is sent in full (or given up).
struct Tracked {
    body: Body,
    _open: Open,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{Notify, mpsc};

    use super::*;
    use crate::ops::{self, Readiness};

    /// Generous bounds on waits that end much sooner when the server does its job.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// A running test server: the probes, and `/hold`, which says when it has started and answers
    /// once `release` is notified.
    struct Server {
        addr: SocketAddr,
        release: Arc<Notify>,
        held: mpsc::Receiver<()>,
    }

    async fn start(limits: HttpLimits) -> Server {
        let (tell, held) = mpsc::channel(16);
        let release = Arc::new(Notify::new());
        let waiting = release.clone();
        let readiness = Readiness::default();
        readiness.set(true);
        let router = Router::new()
            .route(
                "/hold",
                axum::routing::get(move || {
                    let (tell, waiting) = (tell.clone(), waiting.clone());
                    async move {
                        tell.send(()).await.expect("the test listens");
                        waiting.notified().await;
                        "done"
                    }
                }),
            )
            .merge(ops::router(prometheus::Registry::new(), readiness));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(serve(listener, router, limits, std::future::pending()));
        Server { addr, release, held }
    }

    /// Reads `stream` until the server closes it.
    async fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
        let mut read = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut read))
            .await
            .expect("the server closed the connection")
            .expect("reading");
        read
    }

    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// An HTTP/2 frame: 24-bit length, type, flags, stream id, payload.
    fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    #[tokio::test]
    async fn a_connection_that_sends_no_request_is_closed_after_the_header_timeout() {
        let server = start(HttpLimits { header_timeout_s: 1, ..HttpLimits::default() }).await;
        let settings = h2_frame(4, 0, 0, &[]);
        let openings: [&[u8]; 4] = [b"", &H2_PREFACE[..10], H2_PREFACE, &[H2_PREFACE, &settings].concat()];
        for opening in openings {
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream.write_all(opening).await.unwrap();
            read_to_eof(&mut stream).await;
        }
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let server = start(HttpLimits { header_timeout_s: 1, idle_timeout_s: 1, ..HttpLimits::default() }).await;

        // HTTP/1: hyper's header timer runs again while it waits for the next request.
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: reefline\r\n\r\n").await.unwrap();
        let answer = String::from_utf8(read_to_eof(&mut stream).await).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        // HTTP/2: one request (GET /healthz, HPACK-encoded), then the connection has no open stream.
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let get = [&[0x82, 0x86, 0x44, 8][..], b"/healthz"].concat();
        let opening = [H2_PREFACE, &h2_frame(4, 0, 0, &[]), &h2_frame(1, 0x05, 1, &get)].concat();
        stream.write_all(&opening).await.unwrap();
        let (mut answered, mut going_away) = (false, false);
        let mut header = [0u8; 9];
        let read = async {
            // Frames until the server closes; its SETTINGS and PINGs are acknowledged.
            while stream.read_exact(&mut header).await.is_ok() {
                let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                let mut payload = vec![0; len];
                stream.read_exact(&mut payload).await.unwrap();
                let (kind, flags, stream_id) =
                    (header[3], header[4], u32::from_be_bytes(header[5..].try_into().unwrap()));
                match kind {
                    1 if stream_id == 1 => answered = true,
                    4 if flags & 1 == 0 => stream.write_all(&h2_frame(4, 1, 0, &[])).await.unwrap(),
                    6 if flags & 1 == 0 => stream.write_all(&h2_frame(6, 1, 0, &payload)).await.unwrap(),
                    7 => going_away = true,
                    _ => {}
                }
            }
        };
        tokio::time::timeout(PATIENCE, read).await.expect("the server closed the idle HTTP/2 connection");
        assert!(answered, "the request was answered");
        assert!(going_away, "the server said GOAWAY");
    }

    #[tokio::test]
    async fn a_request_in_progress_outlasts_the_idle_timeout() {
        let mut server = start(HttpLimits { header_timeout_s: 1, idle_timeout_s: 1, ..HttpLimits::default() }).await;
        let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
        let answer = tokio::spawn(client.get(format!("http://{}/hold", server.addr)).send());
        server.held.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        server.release.notify_one();
        let response = answer.await.unwrap().expect("answered");
        assert_eq!(response.text().await.unwrap(), "done");
    }

    #[tokio::test]
    async fn probes_answer_while_every_request_slot_is_taken() {
        let mut server = start(HttpLimits { max_concurrent: 1, ..HttpLimits::default() }).await;
        let client = reqwest::Client::new();
        let held = tokio::spawn(client.get(format!("http://{}/hold", server.addr)).send());
        server.held.recv().await.unwrap();
        for probe in PROBES {
            let response = tokio::time::timeout(PATIENCE, client.get(format!("http://{}{probe}", server.addr)).send())
                .await
                .unwrap_or_else(|_| panic!("{probe} waited behind the request limit"))
                .unwrap();
            assert_eq!(response.status(), 200, "{probe}");
        }
        server.release.notify_one();
        assert_eq!(held.await.unwrap().unwrap().text().await.unwrap(), "done");
    }

    #[tokio::test]
    async fn a_connection_past_the_limit_waits_for_a_place() {
        let server = start(HttpLimits { header_timeout_s: 1, max_connections: 1, ..HttpLimits::default() }).await;
        let mut silent = std::net::TcpStream::connect(server.addr).unwrap();
        silent.set_nonblocking(true).unwrap();
        let response = tokio::time::timeout(PATIENCE, reqwest::get(format!("http://{}/healthz", server.addr)))
            .await
            .expect("answered once the silent connection was closed")
            .unwrap();
        assert_eq!(response.status(), 200);
        // The second connection was served only after the first was closed.
        let mut buf = [0u8; 16];
        assert_eq!(std::io::Read::read(&mut silent, &mut buf).map_err(|e| e.kind()), Ok(0));
    }
}
