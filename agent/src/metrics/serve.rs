//! `GET /metrics` over HTTP/1 (hyper), optionally over TLS, on the daemon's tokio runtime.
//!
//! A scrape never waits for the poll loop: [`Source::scrape`] takes a snapshot under the
//! short locks the loop also takes once per tick, and the encoding runs here. What a
//! connection may hold, and for how long, is decided in [`super::conns`]; who may read,
//! in [`super::auth`].
use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Scrape,
    auth::Credentials,
    conns::{Conn, Limits, Refusal, Registry, ServeStats, Slot, TimedIo},
    exposition::{Format, render},
    peer::PeerLookup,
};

/// hyper's smallest read buffer.
const MIN_BUF: usize = 8192;

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

pub struct MetricsServer {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    stats: Arc<ServeStats>,
    limits: Limits,
    creds: Credentials,
}

/// What every connection's task needs.
struct Ctx<S> {
    source: Arc<S>,
    stats: Arc<ServeStats>,
    limits: Limits,
    creds: Credentials,
}

impl MetricsServer {
    /// Binds now, so a taken port is reported at start.
    pub fn bind(
        addr: SocketAddr,
        limits: Limits,
        creds: Credentials,
    ) -> Result<MetricsServer, MetricsError> {
        let err = |source| MetricsError::Bind { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        Ok(MetricsServer {
            listener,
            addr,
            stats: Arc::default(),
            limits,
            creds,
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
        let registry = Arc::new(Registry::new(self.limits.clone(), self.stats.clone()));
        let mut peers = PeerLookup::new();
        let ctx = Arc::new(Ctx {
            source,
            stats: self.stats,
            limits: self.limits,
            creds: self.creds,
        });
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning.
                    log::warn!("metrics endpoint accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let local = stream.local_addr().unwrap_or(self.addr);
            // Refused (and counted) connections are closed by dropping them.
            let Ok(slot) = registry.admit(peers.key(peer, local), Instant::now()) else {
                continue;
            };
            tokio::spawn(serve_connection(stream, slot, ctx.clone()));
        }
    }
}

/// One connection until it ends, times out, or is evicted.
async fn serve_connection<S: Source>(stream: tokio::net::TcpStream, slot: Slot, ctx: Arc<Ctx<S>>) {
    let conn = slot.conn.clone();
    let io = TimedIo::new(stream, conn.clone(), ctx.limits.write_timeout);
    let work = async {
        match &ctx.creds.tls {
            Some(cfg) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                match tokio::time::timeout(ctx.limits.read_timeout, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => http(tls, &conn, &ctx).await,
                    // Plain HTTP to the HTTPS port, no or a bad client certificate, or too
                    // slow: the details are the client's to see.
                    Ok(Err(_)) | Err(_) => ctx.stats.count(Refusal::TlsHandshake),
                }
            }
            None => http(io, &conn, &ctx).await,
        }
    };
    tokio::select! {
        () = work => {}
        () = conn.evict.notified() => {}
    }
    drop(slot);
}

async fn http<S: Source, I>(io: I, conn: &Arc<Conn>, ctx: &Arc<Ctx<S>>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (c, cx) = (conn.clone(), ctx.clone());
    let svc = service_fn(move |req| {
        c.touch();
        let reply = answer(&cx, &req);
        async move { Ok::<_, Infallible>(reply) }
    });
    let l = &ctx.limits;
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(l.read_timeout)
        .max_header_size(l.max_header_bytes)
        .max_buf_size(l.max_header_bytes.max(MIN_BUF))
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(served);
    let result = tokio::select! {
        r = served.as_mut() => r,
        () = tokio::time::sleep(l.max_age) => {
            ctx.stats.closed_at_max_age.fetch_add(1, Ordering::Relaxed);
            // The reply under way is finished; a client that stalls it meets the timeouts.
            served.as_mut().graceful_shutdown();
            match tokio::time::timeout(l.read_timeout + l.write_timeout, served.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        let reason = if conn.write_timed_out.load(Ordering::Relaxed) {
            Refusal::WriteTimeout
        } else if e.is_timeout() {
            Refusal::RequestTimeout
        } else if e.is_parse_too_large() {
            Refusal::HeaderTooLarge
        } else {
            // A client that went away: not the endpoint's refusal.
            return;
        };
        ctx.stats.count(reason);
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

fn answer<S: Source, B>(ctx: &Ctx<S>, req: &Request<B>) -> Response<Full<Bytes>> {
    if let Some(token) = &ctx.creds.token
        && !token.admits(req.headers().get(header::AUTHORIZATION))
    {
        ctx.stats.count(Refusal::Unauthorized);
        let mut r = plain(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required (Authorization: Bearer TOKEN)\n",
        );
        let h = r.headers_mut();
        h.insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"sockacct\""),
        );
        // An unauthenticated client does not keep a slot.
        h.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return r;
    }
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
            ctx.stats.scrapes.fetch_add(1, Ordering::Relaxed);
            let body = render(ctx.source.scrape(), format);
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
