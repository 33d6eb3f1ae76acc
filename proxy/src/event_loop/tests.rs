//! Both loops, driven the same way: an echo server, a relay in front of an upstream
//! (connect, both directions, backpressure with a slow reader), closes and wake-ups.

use super::epoll::EpollLoop;
use super::uring::UringLoop;
use super::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// A pseudo-random payload (so that misplaced bytes show).
fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// An echo server on `lp`: every connection gets its bytes back; it runs until `stop`.
fn echo<L: EventLoop>(mut lp: L, stop: Arc<AtomicBool>) {
    #[derive(Default)]
    struct Conn {
        pending: Vec<u8>,
        sending: bool,
        ended: bool,
    }
    let mut conns: HashMap<Token, Conn> = HashMap::new();
    while !stop.load(Ordering::Acquire) {
        lp.turn(Some(Duration::from_millis(200)), &mut |ctl, ev| match ev {
            Event::Accepted { socket, peer, .. } => {
                assert!(peer.is_some(), "an accepted TCP peer has an address");
                let t = ctl.adopt(socket);
                ctl.recv(t);
                conns.insert(t, Conn::default());
            }
            Event::Data { token, bytes } => {
                let c = conns.get_mut(&token).expect("data for a known connection");
                c.pending.extend_from_slice(bytes);
                if !c.sending {
                    c.sending = true;
                    ctl.send(token, std::mem::take(&mut c.pending), 0);
                }
            }
            Event::Sent { token, result, .. } => {
                result.expect("echo send");
                let c = conns.get_mut(&token).expect("sent on a known connection");
                c.sending = false;
                if !c.pending.is_empty() {
                    c.sending = true;
                    ctl.send(token, std::mem::take(&mut c.pending), 0);
                } else if c.ended {
                    ctl.close(token);
                    conns.remove(&token);
                }
            }
            Event::Closed { token, .. } => {
                if let Some(c) = conns.get_mut(&token) {
                    c.ended = true;
                    if !c.sending {
                        ctl.close(token);
                        conns.remove(&token);
                    }
                }
            }
            Event::Connected { .. } | Event::Woken => {}
        })
        .unwrap();
    }
}

/// Clients that write and read back payloads of several sizes, interleaved.
fn clients(addr: SocketAddr) {
    let ts: Vec<_> = (0..4u8)
        .map(|k| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                for n in [1, 100, 4096, 16 * 1024 + 3, 200_000, 3_000_000] {
                    let p = payload(n, k);
                    let w = {
                        let mut s = s.try_clone().unwrap();
                        std::thread::spawn(move || s.write_all(&p).map(|_| p))
                    };
                    let mut got = vec![0u8; n];
                    s.read_exact(&mut got).unwrap();
                    let p = w.join().unwrap().unwrap();
                    assert!(got == p, "{n} bytes came back changed");
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
}

/// Starts a loop made by `make` on a thread of its own (a ring belongs to the thread
/// that made it) running `run`; its waker.
fn on_thread<L: EventLoop + 'static>(
    make: fn(Vec<TcpListener>) -> io::Result<L>,
    listeners: Vec<TcpListener>,
    run: impl FnOnce(L) + Send + 'static,
) -> (Waker, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let lp = make(listeners).unwrap();
        tx.send(lp.waker()).unwrap();
        run(lp);
    });
    (rx.recv().unwrap(), t)
}

fn run_echo<L: EventLoop + 'static>(make: fn(Vec<TcpListener>) -> io::Result<L>) {
    let (l, addr) = listener();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let (waker, server) = on_thread(make, vec![l], move |lp| echo(lp, s2));
    clients(addr);
    stop.store(true, Ordering::Release);
    waker.wake();
    server.join().unwrap();
}

#[test]
fn uring_echoes_every_byte_in_order() {
    run_echo(UringLoop::new);
}

#[test]
fn epoll_echoes_every_byte_in_order() {
    run_echo(EpollLoop::new);
}

/// The null relay in front of an echo upstream: connect, both directions, and a client
/// that reads slowly (the relay holds back, its memory bounded by its high-water mark).
fn run_relay<L: EventLoop + 'static>(make: fn(Vec<TcpListener>) -> io::Result<L>) {
    let (ul, upstream) = listener();
    let (rl, relay_addr) = listener();
    let stop = Arc::new(AtomicBool::new(false));
    let (s1, s2) = (stop.clone(), stop.clone());
    let (uw, echo_thread) = on_thread(make, vec![ul], move |lp| echo(lp, s1));
    let (rw, relay_thread) = on_thread(make, vec![rl], move |lp| {
        crate::relay::serve(lp, upstream, s2)
    });
    clients(relay_addr);
    // A slow reader of a large transfer: everything arrives, in order.
    let mut s = TcpStream::connect(relay_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let p = payload(8_000_000, 9);
    let w = {
        let mut s = s.try_clone().unwrap();
        let p = p.clone();
        std::thread::spawn(move || s.write_all(&p))
    };
    let mut got = Vec::with_capacity(p.len());
    let mut chunk = vec![0u8; 1024];
    while got.len() < p.len() {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed early at {}", got.len());
        got.extend_from_slice(&chunk[..n]);
        if got.len() < 64 * 1024 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    w.join().unwrap().unwrap();
    assert!(got == p, "the slow reader's bytes came back changed");
    // The client closes: the relay closes the upstream side too.
    drop(s);
    stop.store(true, Ordering::Release);
    uw.wake();
    rw.wake();
    echo_thread.join().unwrap();
    relay_thread.join().unwrap();
}

#[test]
fn uring_relays_both_ways_with_backpressure() {
    run_relay(UringLoop::new);
}

#[test]
fn epoll_relays_both_ways_with_backpressure() {
    run_relay(EpollLoop::new);
}

/// A connect to a closed port fails with its error; a wake-up from another thread ends a
/// wait long before its timeout.
fn run_connect_and_wake<L: EventLoop>(make: fn(Vec<TcpListener>) -> io::Result<L>) {
    let mut lp = make(Vec::new()).unwrap();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let t = lp.ctl().connect(closed).unwrap();
    let mut result = None;
    while result.is_none() {
        lp.turn(Some(Duration::from_secs(5)), &mut |_, ev| {
            if let Event::Connected { token, result: r } = ev {
                assert_eq!(token, t);
                result = Some(r);
            }
        })
        .unwrap();
    }
    let e = result.unwrap().expect_err("nothing listens there");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    let waker = lp.waker();
    let started = std::time::Instant::now();
    let w = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        waker.wake();
    });
    let mut woken = false;
    while !woken {
        lp.turn(Some(Duration::from_secs(30)), &mut |_, ev| {
            woken |= matches!(ev, Event::Woken);
        })
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(20), "never woken");
    }
    w.join().unwrap();
}

#[test]
fn uring_connects_and_wakes() {
    run_connect_and_wake(UringLoop::new);
}

#[test]
fn epoll_connects_and_wakes() {
    run_connect_and_wake(EpollLoop::new);
}

#[test]
fn slots_are_reused_with_a_new_generation() {
    let mut ctl = Ctl::default();
    let (a, _) = listener();
    let (b, _) = listener();
    let t1 = ctl.adopt(a.into());
    assert!(ctl.fd(t1).is_some());
    let fd = ctl.detach(t1).expect("a live slot");
    assert!(ctl.fd(t1).is_none(), "a detached token is dead");
    drop(fd);
    let t2 = ctl.adopt(b.into());
    assert_eq!(t2.index(), t1.index());
    assert_ne!(t2, t1, "the reused slot has a new generation");
    assert!(ctl.detach(t1).is_none());
}

/// A paused accept shortens the turn's wait to its end, never lengthens it.
#[test]
fn a_paused_accept_shortens_the_wait() {
    let now = std::time::Instant::now();
    let mut p = AcceptPause::default();
    assert_eq!(
        p.limit(Some(Duration::from_secs(5)), now),
        Some(Duration::from_secs(5))
    );
    assert_eq!(p.limit(None, now), None);
    p.failed(&std::io::Error::from_raw_os_error(libc::EMFILE), now);
    assert_eq!(
        p.limit(Some(Duration::from_secs(5)), now),
        Some(ACCEPT_BACKOFF)
    );
    assert_eq!(p.limit(None, now), Some(ACCEPT_BACKOFF));
    let ms = Duration::from_millis(10);
    assert_eq!(p.limit(Some(ms), now), Some(ms));
    assert_eq!(
        p.limit(None, now + ACCEPT_BACKOFF * 2),
        Some(Duration::ZERO)
    );
}

/// A failed accept pauses accepting for the backoff, and the pause runs out by itself.
#[test]
fn a_failed_accept_pauses_then_resumes() {
    let now = std::time::Instant::now();
    let mut p = AcceptPause::default();
    assert!(!p.paused(now) && !p.ran_out(now));
    p.failed(&std::io::Error::from_raw_os_error(libc::EMFILE), now);
    assert!(p.paused(now), "paused right after the failure");
    let later = now + ACCEPT_BACKOFF - Duration::from_millis(1);
    assert!(!p.ran_out(later), "still paused");
    let after = now + ACCEPT_BACKOFF;
    assert!(p.ran_out(after), "the pause is over");
    assert!(
        !p.ran_out(after) && !p.paused(after),
        "and is reported once"
    );
    assert_eq!(p.limit(None, after), None);
    p.accepted();
    assert!(!p.failing);
}
