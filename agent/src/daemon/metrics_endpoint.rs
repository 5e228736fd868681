//! The metrics endpoint as the daemon starts it: bound at start (a taken port does not
//! stop the agent) and described in `status`.
use std::sync::{Arc, atomic::Ordering};

use log::{info, warn};

use crate::{
    metrics::{
        MetricsServer,
        auth::Credentials,
        conns::{Limits, ServeStats},
    },
    status::{MetricsLimits, MetricsStatus},
};

/// The metrics endpoint as bound at start.
pub(super) struct MetricsEndpoint {
    listen: Option<std::net::SocketAddr>,
    error: Option<String>,
    stats: Arc<ServeStats>,
    auth: &'static str,
    tls: &'static str,
    limits: MetricsLimits,
}

impl MetricsEndpoint {
    pub(super) fn status(&self) -> MetricsStatus {
        let s = &self.stats;
        MetricsStatus {
            listen: self.listen.map(|a| a.to_string()),
            error: self.error.clone(),
            scrapes: s.scrapes.load(Ordering::Relaxed),
            connections_open: s.open.load(Ordering::Relaxed),
            connections_accepted: s.accepted.load(Ordering::Relaxed),
            refused: s.refused(),
            closed_at_max_age: s.closed_at_max_age.load(Ordering::Relaxed),
            auth: self.auth,
            tls: self.tls,
            limits: self.limits.clone(),
        }
    }
}

/// Binds the metrics endpoint when it is on. A port that cannot be bound does not stop
/// the agent (counting matters more than its view): it is logged and shown by `status`.
pub(super) fn bind_metrics(
    c: &crate::config::MetricsSection,
    creds: Credentials,
) -> (Option<MetricsServer>, Option<MetricsEndpoint>) {
    if !c.enabled {
        return (None, None);
    }
    let tls = match (&creds.tls, creds.client_certs) {
        (None, _) => "off",
        (Some(_), false) => "on",
        (Some(_), true) => "client_certificates",
    };
    let endpoint = |listen, error| MetricsEndpoint {
        listen,
        error,
        stats: Arc::default(),
        auth: creds.auth_name(),
        tls,
        limits: c.into(),
    };
    let addr = match c.listen_addr() {
        Ok(a) => a,
        Err(e) => {
            // validate() checked it; kept for callers that skip validation.
            warn!("{e}; metrics are off");
            return (None, Some(endpoint(None, Some(e))));
        }
    };
    let scheme = if creds.tls.is_some() { "https" } else { "http" };
    let clear_token = creds.token.is_some() && creds.tls.is_none();
    match MetricsServer::bind(addr, Limits::from_config(c), creds.clone()) {
        Ok(m) => {
            let a = m.local_addr();
            if a.ip().is_loopback() {
                info!("metrics on {scheme}://{a}/metrics");
            } else {
                info!(
                    "metrics on {scheme}://{a}/metrics (not loopback: reachable from the network)"
                );
                if clear_token {
                    warn!(
                        "metrics: the bearer token travels in clear text to {a}; set [metrics] tls_cert_file and tls_key_file"
                    );
                }
            }
            let mut ep = endpoint(Some(a), None);
            ep.stats = m.stats();
            (Some(m), Some(ep))
        }
        Err(e) => {
            warn!("{e}; the agent runs on without metrics");
            (None, Some(endpoint(None, Some(e.to_string()))))
        }
    }
}
