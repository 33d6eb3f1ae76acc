//! Unix socket endpoints (`listen = "unix:/run/dbproxy/mysql.sock"`): clients on the same
//! host without TCP. SO_REUSEPORT does not apply to Unix sockets, so one socket is bound
//! and a thread of its own accepts on it, handing each connection to the next worker (which
//! adopts it as it adopts a connection moved from another core).

use super::{Detached, DetachedSocket};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Binds `path` (replacing a stale socket file, never a live one) and starts accepting;
/// returns each worker's inbox and the accepting thread (it ends, removing the socket
/// file, once `stopping` says dbproxy drains or stops).
pub fn start(
    path: &Path,
    workers: usize,
    stopping: Arc<dyn Fn() -> bool + Send + Sync>,
) -> io::Result<(
    Vec<UnboundedReceiver<Detached>>,
    std::thread::JoinHandle<()>,
)> {
    let listener = bind(path)?;
    listener.set_nonblocking(true)?;
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..workers.max(1)).map(|_| unbounded_channel()).unzip();
    let path = path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("dbproxy-unix".into())
        .spawn(move || accept_loop(listener, path, txs, stopping))?;
    Ok((rxs, thread))
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{}: another process listens there", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    // Any local user may connect, as to MariaDB's own socket: dbproxy authenticates them.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(l)
}

/// Removes the socket file when the accepting thread ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn accept_loop(
    listener: UnixListener,
    path: PathBuf,
    inboxes: Vec<UnboundedSender<Detached>>,
    stopping: Arc<dyn Fn() -> bool + Send + Sync>,
) {
    let _file = SocketFile(path);
    let mut next = 0usize;
    while !stopping() {
        let mut p = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the timeout bounds how late a drain is noticed.
        let n = unsafe { libc::poll(&mut p, 1, 200) };
        if n <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let mut d = Detached {
                    socket: DetachedSocket::Unix(stream),
                    tls: None,
                };
                // The next worker that still runs (a stopped one's inbox is closed).
                for _ in 0..inboxes.len() {
                    next = (next + 1) % inboxes.len();
                    let Some(tx) = inboxes.get(next) else {
                        break;
                    };
                    match tx.send(d) {
                        Ok(()) => break,
                        Err(e) => d = e.0,
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("Unix socket accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}
