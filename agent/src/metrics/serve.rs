//! `GET /metrics` over HTTP/1 (hyper), on the daemon's tokio runtime.
//!
//! A scrape never waits for the poll loop: [`Source::scrape`] takes a snapshot under the
//! short locks the loop also takes once per tick, and the encoding runs here.
use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::{
    Scrape,
    exposition::{Format, render},
};

/// Connections served at once; more are closed at once (and counted).
const MAX_CONNECTIONS: usize = 16;
/// A scraper keeps its connection for reuse; after this it reconnects.
const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(300);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "metrics endpoint: cannot listen on {addr}: {source} (choose another with [metrics] listen or --metrics-listen, or turn it off with --no-metrics)"
    )]
    Bind { addr: SocketAddr, source: io::Error },
}

/// What a scrape shows.
pub trait Source: Send + Sync + 'static {
    fn scrape(&self) -> Scrape;
}

/// Counters of the endpoint itself.
#[derive(Debug, Default)]
pub struct ServeStats {
    pub scrapes: AtomicU64,
    /// Connections closed unserved because MAX_CONNECTIONS were open.
    pub refused_connections: AtomicU64,
}

pub struct MetricsServer {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    stats: Arc<ServeStats>,
}

impl MetricsServer {
    /// Binds now, so a taken port is reported at start.
    pub fn bind(addr: SocketAddr) -> Result<MetricsServer, MetricsError> {
        let err = |source| MetricsError::Bind { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        Ok(MetricsServer {
            listener,
            addr,
            stats: Arc::default(),
        })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> Arc<ServeStats> {
        self.stats.clone()
    }

    /// Serves until the task is dropped.
    pub async fn serve<S: Source>(self, source: Arc<S>) {
        let listener = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("metrics endpoint {}: {e}; not serving", self.addr);
                return;
            }
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning.
                    log::warn!("metrics endpoint accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                self.stats
                    .refused_connections
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (source, stats) = (source.clone(), self.stats.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let reply = answer(&*source, &stats, &req);
                    async move { Ok::<_, Infallible>(reply) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(MAX_CONNECTION_LIFE, conn).await;
                drop(slot);
            });
        }
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn answer<S: Source, B>(source: &S, stats: &ServeStats, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET (and HEAD) are served\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = Format::negotiate(accept);
            stats.scrapes.fetch_add(1, Ordering::Relaxed);
            let body = render(source.scrape(), format);
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(format.content_type()),
            );
            r
        }
        "/" => plain(
            StatusCode::OK,
            "sockacct: Prometheus metrics are at /metrics\n",
        ),
        p => plain(
            StatusCode::NOT_FOUND,
            &format!("no such path {p:?}: metrics are at /metrics\n"),
        ),
    }
}
