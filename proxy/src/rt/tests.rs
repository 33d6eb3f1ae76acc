use super::*;
use std::rc::Rc;

/// Runs `f` on a ring runtime of this thread, unless io_uring cannot be used here.
fn on_runtime<F: Future<Output = ()> + 'static>(f: F) -> bool {
    if available().is_err() {
        return false;
    }
    block_on(Flavor::Ring, f).map(|_| true).unwrap_or(false)
}

/// Runs `make()` on a runtime of each flavor this machine has.
fn on_each(mut make: impl FnMut(Flavor) -> Pin<Box<dyn Future<Output = ()>>>) -> usize {
    let mut ran = 0;
    for flavor in [Flavor::Epoll, Flavor::Ring] {
        if flavor == Flavor::Ring && available().is_err() {
            continue;
        }
        block_on(flavor, make(flavor)).unwrap_or_else(|e| panic!("{flavor:?}: {e}"));
        ran += 1;
    }
    ran
}

#[test]
fn both_flavors_run_timers_tasks_and_wakes_from_other_threads() {
    let ran = on_each(|flavor| {
        Box::pin(async move {
            let seen = Rc::new(RefCell::new(Vec::new()));
            for (i, ms) in [(1, 30u64), (2, 10), (3, 20)] {
                let s = seen.clone();
                spawn(async move {
                    time::sleep(Duration::from_millis(ms)).await;
                    s.borrow_mut().push(i);
                });
            }
            time::sleep(Duration::from_millis(50)).await;
            assert_eq!(*seen.borrow(), vec![2, 3, 1], "{flavor:?}");
            let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                let _ = tx.send(42);
            });
            // The deadline is polled first: if only the timer woke the runtime (the eventfd
            // did not), the wait ends with the deadline instead of the value, and the test
            // fails instead of hanging.
            let mut rx = std::pin::pin!(rx);
            let mut deadline = std::pin::pin!(time::sleep(Duration::from_secs(10)));
            let got = std::future::poll_fn(|cx| {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                rx.as_mut().poll(cx).map(|v| v.ok())
            })
            .await;
            assert_eq!(got, Some(42), "{flavor:?}: woken by the other thread");
        })
    });
    assert!(ran >= 1);
}

#[test]
fn an_epoll_socket_waits_for_readiness_and_is_deregistered_when_dropped() {
    use std::io::{Read, Write};
    let ran = on_each(|flavor| {
        Box::pin(async move {
            if flavor != Flavor::Epoll {
                assert!(register(0).is_err(), "a ring runtime has no epoll");
                return;
            }
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
            b.set_nonblocking(true).unwrap_or_else(|e| panic!("{e}"));
            let reg = register(b.as_raw_fd()).unwrap_or_else(|e| panic!("{e}"));
            // Nothing to read yet: the call would block, and the task waits.
            let mut got = [0u8; 8];
            assert!((&b).read(&mut got).is_err());
            reg.would_block(Interest::Read);
            let writer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                (&a).write_all(b"hi").unwrap_or_else(|e| panic!("{e}"));
                a
            });
            let waited = time::timeout(Duration::from_secs(5), reg.ready(Interest::Read)).await;
            assert!(waited.is_ok());
            assert_eq!((&b).read(&mut got).ok(), Some(2));
            let _a = writer.join();
            let before = with_poller(|p| p.registered()).unwrap_or_default();
            drop(reg);
            let after = with_poller(|p| p.registered()).unwrap_or_default();
            assert_eq!(after + 1, before);
        })
    });
    assert!(ran >= 1);
}

#[test]
fn a_timeout_ends_a_wait_and_an_aborted_task_never_runs_on() {
    let seen = Rc::new(Cell::new(0));
    let s = seen.clone();
    on_runtime(async move {
        let never = std::future::pending::<()>();
        let r = time::timeout(Duration::from_millis(5), never).await;
        assert_eq!(r, Err(time::Elapsed));
        let ok = time::timeout(Duration::from_secs(5), async { 7 }).await;
        assert_eq!(ok, Ok(7));
        let s2 = s.clone();
        let h = spawn(async move {
            time::sleep(Duration::from_millis(20)).await;
            s2.set(1);
        });
        time::sleep(Duration::from_millis(1)).await;
        h.abort();
        time::sleep(Duration::from_millis(40)).await;
        s.set(s.get() + 10);
    });
    if available().is_ok() {
        assert_eq!(seen.get(), 10, "the aborted task did not finish");
    }
}

#[test]
fn a_dropped_receive_is_cancelled_and_its_buffer_outlives_it() {
    use std::io::Write;
    let got = Rc::new(Cell::new(0usize));
    let g = got.clone();
    on_runtime(async move {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let fd = b.as_raw_fd();
        let recv = |cap: usize| {
            start(Held::Buf(Vec::with_capacity(cap)), move |h| {
                let ptr = match h {
                    Held::Buf(b) => b.as_mut_ptr(),
                    _ => std::ptr::null_mut(),
                };
                io_uring::opcode::Recv::new(io_uring::types::Fd(fd), ptr, cap as u32).build()
            })
            .ok()
        };
        // Given up at once: nothing arrives for it.
        let r = time::timeout(Duration::from_millis(5), async {
            if let Some(op) = recv(64) {
                op.await;
            }
        })
        .await;
        assert!(r.is_err());
        a.write_all(b"abc").unwrap_or_else(|e| panic!("{e}"));
        if let Some(op) = recv(64) {
            let (n, held) = op.await;
            assert!(matches!(held, Held::Buf(_)));
            g.set(n.max(0) as usize);
        }
    });
    if available().is_ok() {
        assert_eq!(got.get(), 3, "the second receive got the bytes");
    }
}
