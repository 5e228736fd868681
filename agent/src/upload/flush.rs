//! A flush: seal the spool, upload every pending body oldest first, acknowledge each one
//! the server stored, stop at the first failure. What `sockacct flush` (and the periodic
//! upload) runs; the receipt is what the admin sees.
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::Uploader;
use crate::spool::Spool;

/// What a flush did. `ok` is false when anything failed; what was sent before the failure
/// stays acknowledged.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlushReceipt {
    pub ok: bool,
    pub error: Option<String>,
    pub sent: Sent,
    /// One entry per body the server stored.
    pub server: Vec<ServerAnswer>,
    /// Bodies of the failing batch that were not sent (they stay in the spool).
    pub bodies_unsent_in_batch: u64,
    /// Sealed segments still waiting for an upload after this flush.
    pub segments_pending: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Sent {
    pub bodies: u64,
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerAnswer {
    pub status: u16,
    pub attempts: u32,
    pub said: String,
    pub ms: u64,
    pub idempotency_key: String,
}

impl FlushReceipt {
    /// A flush that could not start.
    pub fn failed(why: impl Into<String>) -> FlushReceipt {
        FlushReceipt {
            ok: false,
            error: Some(why.into()),
            ..FlushReceipt::default()
        }
    }
}

fn lock(m: &Mutex<Spool>) -> std::sync::MutexGuard<'_, Spool> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a spool operation off the async threads (it does file I/O and fsyncs).
async fn blocking<T: Send + 'static, E: std::fmt::Display>(
    spool: &Arc<Mutex<Spool>>,
    f: impl FnOnce(&mut Spool) -> Result<T, E> + Send + 'static,
) -> Result<T, String> {
    let sp = spool.clone();
    tokio::task::spawn_blocking(move || f(&mut lock(&sp)).map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
}

/// Seals and uploads everything pending, in bodies of at most `max_body` bytes.
pub async fn flush(spool: &Arc<Mutex<Spool>>, up: &Uploader, max_body: u64) -> FlushReceipt {
    // Seal first so everything written so far is uploadable. A failed seal does not stop
    // older sealed segments from going out.
    let seal_error = blocking(spool, |s| s.seal()).await.err();
    let deadline = up.flush_deadline();
    let mut r = FlushReceipt::default();
    let mut segments: Vec<String> = vec![];
    // The spool hands out a bounded batch of bodies per call: loop until done.
    'batches: loop {
        let bodies = match blocking(spool, move |s| s.bodies(max_body)).await {
            Ok(b) => b,
            Err(e) => {
                r.error = Some(format!("reading the spool: {e}"));
                break;
            }
        };
        if bodies.is_empty() {
            break;
        }
        for (i, b) in bodies.iter().enumerate() {
            match up.send(b, deadline).await {
                Ok(answer) => {
                    let pos = b.pos.clone();
                    if let Err(e) = blocking(spool, move |s| s.acknowledge(pos)).await {
                        // The server has it; we could not record that. A retry sends it
                        // again with the same idempotency key.
                        r.error = Some(format!(
                            "the server stored seq {}..={} but recording that failed: {e}",
                            b.first_seq, b.last_seq
                        ));
                        r.bodies_unsent_in_batch = (bodies.len() - i - 1) as u64;
                        break 'batches;
                    }
                    r.sent.bodies += 1;
                    r.sent.records += b.records;
                    r.sent.bytes += b.data.len() as u64;
                    if !segments.contains(&b.segment) {
                        segments.push(b.segment.clone());
                    }
                    r.sent.first_seq.get_or_insert(b.first_seq);
                    r.sent.last_seq = Some(b.last_seq);
                    r.server.push(ServerAnswer {
                        status: answer.status,
                        attempts: answer.attempts,
                        said: answer.server_said,
                        ms: answer.elapsed.as_millis() as u64,
                        idempotency_key: b.idempotency_key(),
                    });
                }
                Err(e) => {
                    r.error = Some(e.to_string());
                    r.bodies_unsent_in_batch = (bodies.len() - i) as u64;
                    break 'batches;
                }
            }
        }
    }
    if r.error.is_none() {
        r.error = seal_error
            .map(|e| format!("sealing the active segment failed ({e}); older segments were sent"));
    }
    r.sent.segments = segments.len();
    r.segments_pending = lock(spool).pending().len();
    r.ok = r.error.is_none();
    r
}
