//! Serving an HTTP API with the limits a public service needs: a client gets a bounded time to
//! send its request headers (a slowloris client that trickles them is cut off), a request a
//! bounded time to be answered (then `408`), and only so many requests are handled at once (the
//! rest wait their turn). `axum::serve` sets none of these.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Limits on what one client can hold of an HTTP server.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct HttpLimits {
    /// Longest a client may take to send a request's headers, in seconds; the connection is then closed.
    #[arg(long = "http-header-timeout-s", env = "HTTP_HEADER_TIMEOUT_S", default_value_t = 10)]
    pub header_timeout_s: u64,

    /// Longest a request may take to be answered, its body included, in seconds; then `408`.
    #[arg(long = "http-request-timeout-s", env = "HTTP_REQUEST_TIMEOUT_S", default_value_t = 90)]
    pub request_timeout_s: u64,

    /// Requests handled at once; more wait for a turn (within their request timeout).
    #[arg(long = "http-max-concurrent", env = "HTTP_MAX_CONCURRENT", default_value_t = 1024)]
    pub max_concurrent: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { header_timeout_s: 10, request_timeout_s: 90, max_concurrent: 1024 }
    }
}

/// How long a stopping server lets requests in progress finish.
const DRAIN: Duration = Duration::from_secs(10);

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
    let router = router
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(limits.request_timeout_s),
        ))
        .merge(streaming)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(limits.max_concurrent.max(1)));
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(limits.header_timeout_s.max(1)));
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = router.clone().map_request(|request: Request<hyper::body::Incoming>| request.map(Body::new));
        let connection =
            builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still in progress after {DRAIN:?}; stopping anyway");
    }
}
