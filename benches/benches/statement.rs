//! One statement proxied end to end: a client in this process sends a point SELECT (text
//! protocol, COM_QUERY) or executes it prepared (binary protocol, COM_STMT_EXECUTE) through
//! dbproxy, running in this process on one worker (io_uring and epoll), to a MariaDB the
//! bench starts; the same statements straight to MariaDB for comparison.
//!
//! A counting allocator reports how many heap allocations dbproxy's worker threads (where
//! statements are served) make per proxied statement, and fails if a statement costs one.
//! Its other threads (the monitor, the secrets and admin runtimes) are counted apart and
//! reported: their work does not follow the statements (a health check's login lands in a
//! window or not), so it cannot decide whether a statement allocates. Needs `mariadbd` (apt
//! mariadb-server), as `cargo xtask test` installs it; `cargo xtask test` runs it once as a
//! check.

use criterion::{criterion_group, criterion_main, Criterion};
use proxy_tests::raw::RawClient;
use proxy_tests::{free_port, MariaDb, DB_PASSWORD};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counts allocations (and reallocations): dbproxy's worker threads', and the other
/// threads' but those that opt out.
struct Counting;

/// Allocations on dbproxy's worker threads (`dbproxy-w<n>`).
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Allocations on dbproxy's other threads.
static OTHER: AtomicU64 = AtomicU64::new(0);

/// What a thread is, found once from its name (without allocating).
const UNKNOWN: u8 = 0;
const WORKER: u8 = 1;
const OTHER_THREAD: u8 = 2;
const EXEMPT_THREAD: u8 = 3;

thread_local! {
    static KIND: Cell<u8> = const { Cell::new(UNKNOWN) };
}

/// This thread's allocations are not counted (the bench's own client and harness).
fn exempt() {
    KIND.with(|k| k.set(EXEMPT_THREAD));
}

fn kind_of_this_thread() -> u8 {
    let mut name = [0u8; 16];
    // SAFETY: the buffer holds 16 bytes, the most a thread name has with its NUL.
    let r = unsafe {
        libc::pthread_getname_np(libc::pthread_self(), name.as_mut_ptr().cast(), name.len())
    };
    if r == 0 && name.starts_with(b"dbproxy-w") {
        WORKER
    } else {
        OTHER_THREAD
    }
}

fn count() {
    let k = KIND
        .try_with(|k| {
            if k.get() == UNKNOWN {
                k.set(kind_of_this_thread());
            }
            k.get()
        })
        .unwrap_or(EXEMPT_THREAD);
    match k {
        WORKER => ALLOCATIONS.fetch_add(1, Ordering::Relaxed),
        OTHER_THREAD => OTHER.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A client connection with the two statements ready to send.
struct Client {
    c: RawClient,
    query: Vec<u8>,
    execute: Vec<u8>,
    buf: Vec<u8>,
}

const SQL: &str = "SELECT id, name FROM shop.items WHERE id = ";

impl Client {
    fn new(port: u16, user: &str, password: &str) -> Client {
        let mut c = RawClient::login(port, user, password).expect("login");
        let (id, params) = c.prepare(&format!("{SQL}?"));
        assert_eq!(params, 1);
        let mut query = Vec::new();
        let text = format!("\x03{SQL}7");
        query.extend_from_slice(&(text.len() as u32).to_le_bytes()[..3]);
        query.push(0);
        query.extend_from_slice(text.as_bytes());
        // COM_STMT_EXECUTE: id, no cursor, one iteration, null bitmap, types, LONGLONG 7.
        let mut p = vec![0x17];
        p.extend_from_slice(&id.to_le_bytes());
        p.push(0);
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&[0, 1, 0x08, 0]);
        p.extend_from_slice(&7u64.to_le_bytes());
        let mut execute = (p.len() as u32).to_le_bytes()[..3].to_vec();
        execute.push(0);
        execute.extend_from_slice(&p);
        Client {
            c,
            query,
            execute,
            buf: vec![0; 1 << 16],
        }
    }

    /// Sends one statement and reads its result set (one row) to its end.
    fn run(&mut self, binary: bool) {
        let out = if binary { &self.execute } else { &self.query };
        self.c.s.write_all(out).expect("send");
        // Column count, two column definitions, EOF, one row, EOF (no DEPRECATE_EOF).
        let mut eofs = 0;
        let mut first = true;
        while eofs < 2 {
            let mut h = [0u8; 4];
            self.c.s.read_exact(&mut h).expect("read");
            let n = usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
            let p = &mut self.buf[..n];
            self.c.s.read_exact(p).expect("read");
            assert!(!(first && p.first() == Some(&0xff)), "statement failed");
            first = false;
            if p.first() == Some(&0xfe) && n < 9 {
                eofs += 1;
            }
        }
    }
}

fn start_dbproxy(db: &MariaDb, io: &str) -> (u16, proxy::runtime::Running) {
    let port = free_port();
    let cfg = proxy::config::Config::parse(&format!(
        "[proxy]\nworkers = 1\nio = \"{io}\"\n\
         [[endpoints]]\nname = \"bench\"\nlisten = \"127.0.0.1:{port}\"\ntarget_group = \"db\"\n\
         [[target_groups]]\nname = \"db\"\ntargets = [\"127.0.0.1:{}\"]\nmax_connections = 4\nmax_idle_connections = 4\n\
         health_check_interval = \"1h\"\n\
         [[users]]\nname = \"app\"\npassword = \"apppw\"\nbackend_password = \"{DB_PASSWORD}\"\n",
        db.port
    ))
    .expect("bench config");
    let running = proxy::runtime::start(cfg, None).expect("dbproxy starts");
    (port, running)
}

fn statements(c: &mut Criterion) {
    exempt();
    let db = MariaDb::start();
    db.root_sql(
        "CREATE TABLE shop.items (id INT PRIMARY KEY, name VARCHAR(40)); \
         INSERT INTO shop.items VALUES (7, 'seven'), (8, 'eight');",
    );
    let mut report = String::new();
    let mut targets = vec![("direct".to_string(), db.port, "app", DB_PASSWORD, None)];
    for io in ["uring", "epoll"] {
        if io == "uring" && proxy::rt::available().is_err() {
            continue;
        }
        let (port, running) = start_dbproxy(&db, io);
        targets.push((format!("dbproxy {io}"), port, "app", "apppw", Some(running)));
    }
    // `cargo test` runs this once as a check (fewer statements), `cargo bench` measures.
    let (warm, n) = if std::env::args().any(|a| a == "--bench") {
        (2_000, 20_000)
    } else {
        (500, 5_000)
    };
    let mut g = c.benchmark_group("statement");
    g.measurement_time(Duration::from_secs(4));
    for (name, port, user, password, running) in &targets {
        let mut client = Client::new(*port, user, password);
        for (kind, binary) in [
            ("text, COM_QUERY", false),
            ("binary, COM_STMT_EXECUTE", true),
        ] {
            if running.is_some() {
                // Warm: connections, statement caches, buffers grown to size.
                for _ in 0..warm {
                    client.run(binary);
                }
                let before = ALLOCATIONS.load(Ordering::Relaxed);
                let other_before = OTHER.load(Ordering::Relaxed);
                for _ in 0..n {
                    client.run(binary);
                }
                let made = ALLOCATIONS.load(Ordering::Relaxed) - before;
                let other = OTHER.load(Ordering::Relaxed) - other_before;
                let line = format!(
                    "{name}, {kind}: {:.3} allocations per statement ({made} in {n}; \
                     dbproxy's other threads meanwhile: {other})\n",
                    made as f64 / n as f64
                );
                eprint!("{line}");
                report.push_str(&line);
                // None per statement: what is left is the odd allocation of the worker's
                // periodic upkeep, not the statements'.
                assert!(
                    made * 100 < n,
                    "{name}, {kind}: dbproxy allocates on the statement path ({made} allocations in {n} statements)"
                );
            }
            g.bench_function(format!("{kind}, {name}"), |b| b.iter(|| client.run(binary)));
        }
    }
    g.finish();
    println!("\nallocations by dbproxy per proxied statement:\n{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("allocations.txt"), report);
    for (_, _, _, _, running) in targets {
        if let Some(r) = running {
            r.stop(Duration::from_secs(2));
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = statements
}
criterion_main!(benches);
