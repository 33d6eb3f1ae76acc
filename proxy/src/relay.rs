//! The null relay: dbproxy's event loop forwarding bytes between each client and a
//! connection of its own to one upstream, with no protocol work at all. It is the floor
//! `cargo xtask bench` measures dbproxy against (`dbproxy relay`): what the loop alone
//! costs per query on this machine.

use crate::event_loop::{Ctl, Event, EventLoop, Token};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bytes waiting for one direction's send beyond which receiving on the other side stops.
const HIGH_WATER: usize = 256 * 1024;

/// One direction of a pair: bytes waiting to go, and the send in flight.
#[derive(Debug, Default)]
struct Direction {
    /// Bytes received and not yet handed to a send.
    pending: Vec<u8>,
    /// A spare buffer (the last send's, given back).
    spare: Vec<u8>,
    sending: bool,
    /// The source stopped receiving because too much was pending.
    held: bool,
    /// The source reached its end: close once everything pending is sent.
    ended: bool,
}

/// A client and its upstream connection.
#[derive(Debug)]
struct Pair {
    client: Token,
    upstream: Token,
    /// client -> upstream, upstream -> client.
    up: Direction,
    down: Direction,
    connected: bool,
}

/// What each slot is: which pair, and which side.
#[derive(Debug, Clone, Copy)]
struct Side {
    pair: usize,
    client: bool,
}

/// The relay's state on one worker.
#[derive(Default)]
struct Relay {
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
    sides: Vec<Option<Side>>,
}

impl Relay {
    fn side(&self, t: Token) -> Option<Side> {
        self.sides.get(t.index()).copied().flatten()
    }

    fn set_side(&mut self, t: Token, s: Option<Side>) {
        if self.sides.len() <= t.index() {
            self.sides.resize(t.index() + 1, None);
        }
        self.sides[t.index()] = s;
    }

    fn accepted(&mut self, ctl: &mut Ctl, client: Token, upstream: SocketAddr) {
        let upstream = match ctl.connect(upstream) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("relay: cannot open an upstream connection: {e}");
                ctl.close(client);
                return;
            }
        };
        let pair = Pair {
            client,
            upstream,
            up: Direction::default(),
            down: Direction::default(),
            connected: false,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.pairs[i] = Some(pair);
                i
            }
            None => {
                self.pairs.push(Some(pair));
                self.pairs.len() - 1
            }
        };
        self.set_side(
            client,
            Some(Side {
                pair: i,
                client: true,
            }),
        );
        self.set_side(
            upstream,
            Some(Side {
                pair: i,
                client: false,
            }),
        );
    }

    fn close(&mut self, ctl: &mut Ctl, i: usize) {
        if let Some(p) = self.pairs.get_mut(i).and_then(Option::take) {
            for t in [p.client, p.upstream] {
                ctl.close(t);
                self.set_side(t, None);
            }
            self.free.push(i);
        }
    }

    /// Starts the next send of a direction, if nothing is in flight.
    fn pump(ctl: &mut Ctl, d: &mut Direction, to: Token) {
        if d.sending || d.pending.is_empty() {
            return;
        }
        let mut next = std::mem::take(&mut d.spare);
        next.clear();
        std::mem::swap(&mut next, &mut d.pending);
        d.sending = true;
        ctl.send(to, next, 0);
    }

    fn handle(&mut self, ctl: &mut Ctl, ev: Event<'_>, upstream: SocketAddr) {
        match ev {
            Event::Accepted { socket, .. } => {
                let t = ctl.adopt(socket);
                self.accepted(ctl, t, upstream);
            }
            Event::Connected { token, result } => {
                let Some(s) = self.side(token) else { return };
                if let Err(e) = result {
                    tracing::warn!("relay: upstream connect failed: {e}");
                    self.close(ctl, s.pair);
                    return;
                }
                if let Some(Some(p)) = self.pairs.get_mut(s.pair) {
                    p.connected = true;
                    ctl.recv(p.client);
                    ctl.recv(p.upstream);
                }
            }
            Event::Data { token, bytes } => {
                let Some(s) = self.side(token) else { return };
                let Some(Some(p)) = self.pairs.get_mut(s.pair) else {
                    return;
                };
                let (d, to) = if s.client {
                    (&mut p.up, p.upstream)
                } else {
                    (&mut p.down, p.client)
                };
                d.pending.extend_from_slice(bytes);
                Self::pump(ctl, d, to);
                if d.pending.len() > HIGH_WATER && !d.held {
                    d.held = true;
                    ctl.stop_recv(token);
                }
            }
            Event::Sent { token, buf, result } => {
                let Some(s) = self.side(token) else { return };
                if result.is_err() {
                    self.close(ctl, s.pair);
                    return;
                }
                let Some(Some(p)) = self.pairs.get_mut(s.pair) else {
                    return;
                };
                // A send to the upstream ends a client -> upstream transfer.
                let (d, to, from) = if s.client {
                    (&mut p.down, p.client, p.upstream)
                } else {
                    (&mut p.up, p.upstream, p.client)
                };
                d.sending = false;
                d.spare = buf;
                Self::pump(ctl, d, to);
                if d.held && d.pending.len() <= HIGH_WATER / 2 {
                    d.held = false;
                    ctl.recv(from);
                }
                if d.ended && !d.sending {
                    self.close(ctl, s.pair);
                }
            }
            Event::Closed { token, .. } => {
                let Some(s) = self.side(token) else { return };
                let Some(Some(p)) = self.pairs.get_mut(s.pair) else {
                    return;
                };
                let d = if s.client { &mut p.up } else { &mut p.down };
                d.ended = true;
                if !d.sending {
                    self.close(ctl, s.pair);
                }
            }
            Event::Woken => {}
        }
    }
}

/// Runs a relay worker on `lp` until `stop` is set (and the loop woken).
pub fn serve<L: EventLoop>(mut lp: L, upstream: SocketAddr, stop: Arc<AtomicBool>) {
    let mut relay = Relay::default();
    while !stop.load(Ordering::Acquire) {
        let r = lp.turn(Some(Duration::from_secs(1)), &mut |ctl, ev| {
            relay.handle(ctl, ev, upstream)
        });
        if let Err(e) = r {
            tracing::error!("relay loop failed: {e}");
            return;
        }
    }
}

/// `dbproxy relay`: `workers` threads, each with its own loop (`io_uring` unless `epoll`
/// is asked for) and SO_REUSEPORT listener on `listen`, relaying to `upstream`, until the
/// process is stopped.
pub fn run(
    listen: SocketAddr,
    upstream: SocketAddr,
    workers: usize,
    epoll: bool,
) -> std::io::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..workers.max(1) {
        let l = crate::io::reuseport_listener(listen)?;
        let stop = stop.clone();
        let t = std::thread::Builder::new()
            .name(format!("relay-w{i}"))
            .spawn(move || {
                if epoll {
                    match crate::event_loop::epoll::EpollLoop::new(vec![l]) {
                        Ok(lp) => serve(lp, upstream, stop),
                        Err(e) => tracing::error!("relay: no epoll loop: {e}"),
                    }
                } else {
                    match crate::event_loop::uring::UringLoop::new(vec![l]) {
                        Ok(lp) => serve(lp, upstream, stop),
                        Err(e) => tracing::error!("relay: no io_uring loop: {e}"),
                    }
                }
            })?;
        threads.push(t);
    }
    tracing::info!(%listen, %upstream, workers, io = if epoll { "epoll" } else { "uring" }, "null relay listening");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
