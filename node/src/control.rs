//! The control socket: how `telemed-node submit`, `status` and `show` talk to a
//! running daemon on the same machine.
//!
//! A Unix socket in the data directory (mode 0600: only the node's operator can
//! use it), one JSON request line and one JSON response line per connection.
//! This module must never change a case itself; requests become core inputs.

use crate::daemon::{ControlHandle, StatusReport, SubmitRequest};
use crate::view::CaseView;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted, in bytes.
pub const REQUEST_LEN_MAX: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Submit(SubmitRequest),
    Status,
    Show { case_id: String },
    Studies,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Submitted { case_id: String },
    Status(StatusReport),
    Case(Box<CaseView>),
    Studies(Vec<crate::ingest::StudySummary>),
    Error { message: String },
}

/// Serves the control socket until the daemon stops.
pub async fn serve(path: &Path, handle: ControlHandle) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let handle = handle.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(sock, handle).await {
                    tracing::debug!("control connection: {e}");
                }
            });
        }
    });
    Ok(())
}

async fn answer(sock: UnixStream, handle: ControlHandle) -> std::io::Result<()> {
    let (read, mut write) = sock.into_split();
    let mut line = String::new();
    let n = BufReader::new(read.take_limited()).read_line(&mut line).await?;
    let response = if n == 0 || line.len() >= REQUEST_LEN_MAX {
        Response::Error { message: format!("request empty or longer than {REQUEST_LEN_MAX} bytes") }
    } else {
        match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error { message: format!("bad request: {e}") },
            Ok(Request::Submit(req)) => match handle.submit(req).await {
                Ok(Ok(id)) => Response::Submitted { case_id: id.to_string() },
                Ok(Err(message)) => Response::Error { message },
                Err(e) => Response::Error { message: e.to_string() },
            },
            Ok(Request::Studies) => match handle.studies().await {
                Ok(Ok(list)) => Response::Studies(list),
                Ok(Err(message)) => Response::Error { message },
                Err(e) => Response::Error { message: e.to_string() },
            },
            Ok(Request::Status) => match handle.status().await {
                Ok(s) => Response::Status(s),
                Err(e) => Response::Error { message: e.to_string() },
            },
            Ok(Request::Show { case_id }) => match case_id.parse() {
                Err(_) => Response::Error { message: format!("`{case_id}` is not a case id (32 hex digits)") },
                Ok(id) => match handle.show(id).await {
                    Ok(Some(v)) => Response::Case(Box::new(v)),
                    Ok(None) => Response::Error { message: format!("no case {case_id} at this node") },
                    Err(e) => Response::Error { message: e.to_string() },
                },
            },
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

trait TakeLimited: tokio::io::AsyncRead + Sized {
    fn take_limited(self) -> tokio::io::Take<Self> {
        use tokio::io::AsyncReadExt;
        self.take(REQUEST_LEN_MAX as u64)
    }
}
impl<T: tokio::io::AsyncRead> TakeLimited for T {}

/// Sends one request to the daemon whose data directory holds `socket`.
pub async fn request(socket: &Path, req: &Request) -> std::io::Result<Response> {
    let sock = UnixStream::connect(socket).await?;
    let (read, mut write) = sock.into_split();
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut answer = String::new();
    BufReader::new(read).read_line(&mut answer).await?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}
