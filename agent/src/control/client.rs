//! The CLI's side of the control socket: one request and its reply, or a subscription.
use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream as StdUnixStream,
    path::Path,
    time::Duration,
};

use serde_json::Value;

use super::{ControlError, Request};
use crate::stream::RecordKind;

/// Connects to the control socket, saying what to do when that is not allowed.
fn connect(path: &Path) -> Result<StdUnixStream, ControlError> {
    StdUnixStream::connect(path).map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            ControlError::NotAllowed {
                path: path.to_owned(),
                source,
            }
        } else {
            ControlError::Connect {
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Sends one request and returns the reply object (blocking; used by the CLI).
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Value, ControlError> {
    let req = serde_json::to_string(req).expect("requests serialize");
    let s = connect(path)?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let mut w = &s;
    w.write_all(format!("{req}\n").as_bytes())
        .map_err(|source| ControlError::Io {
            path: path.to_owned(),
            source,
        })?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|source| ControlError::Io {
            path: path.to_owned(),
            source,
        })?;
    serde_json::from_str(&line).map_err(|e| ControlError::BadReply(format!("{e}: {line:?}")))
}

/// Subscribes to the record stream (blocking; used by `events` and `top`): returns the
/// connection, positioned after the agent's acknowledgement, to read JSON lines from.
pub fn subscribe(
    path: &Path,
    types: &[RecordKind],
) -> Result<BufReader<StdUnixStream>, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let req = serde_json::to_string(&Request::Subscribe {
        types: types.to_vec(),
    })
    .expect("requests serialize");
    let s = connect(path)?;
    (&s).write_all(format!("{req}\n").as_bytes()).map_err(io)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(io)?;
    let v: Value = serde_json::from_str(&line)
        .map_err(|e| ControlError::BadReply(format!("{e}: {line:?}")))?;
    if v["ok"] != true {
        return Err(ControlError::Refused(
            v["error"].as_str().unwrap_or("refused").to_string(),
        ));
    }
    Ok(r)
}
