//! Pool checkout plus checkin on one core: what a multiplexed client pays per statement
//! to borrow a warm backend connection and give it back.
//!
//! The connections are real TCP connections, logged in to a stand-in server in this
//! process that speaks just enough of the protocol (greeting, OK to the login and to every
//! command); the measured loop never touches the server.

use criterion::{criterion_group, criterion_main, Criterion};
use proxy::config::Config;
use proxy::io::tokio_net::TokioNet;
use proxy::mysql::consts::{cap, status};
use proxy::mysql::handshake::ServerHandshake;
use proxy::mysql::packet::write_packet;
use proxy::mysql::wire::ok_packet;
use proxy::pool::{CorePool, GroupShared, PoolKey};
use proxy::target::BackendAddr;
use proxy::topology::{Route, Topology};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Reads one packet's payload; `None` at end of stream.
fn read_packet(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize;
    let mut p = vec![0; len];
    s.read_exact(&mut p).ok()?;
    Some(p)
}

fn send(s: &mut TcpStream, seq: u8, payload: &[u8]) -> Option<()> {
    let mut out = Vec::new();
    write_packet(&mut out, seq, payload);
    s.write_all(&out).ok()
}

/// One stand-in server connection: greeting, OK to the login, OK to each command.
fn serve(mut s: TcpStream, id: u32) -> Option<()> {
    let greeting = ServerHandshake {
        version: "10.11.0-standin".into(),
        connection_id: id,
        nonce: vec![b'n'; 20],
        capabilities: cap::PROXY_OFFERS,
        ext_capabilities: 0,
        collation: 45,
        status: status::AUTOCOMMIT,
        auth_plugin: "mysql_native_password".into(),
    };
    send(&mut s, 0, &greeting.encode())?;
    read_packet(&mut s)?;
    send(&mut s, 2, &ok_packet(status::AUTOCOMMIT))?;
    loop {
        let cmd = read_packet(&mut s)?;
        if cmd.first() == Some(&1) {
            return Some(());
        }
        send(&mut s, 1, &ok_packet(status::AUTOCOMMIT))?;
    }
}

fn stand_in_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = l.local_addr().expect("bound address");
    std::thread::spawn(move || {
        for (id, s) in l.incoming().flatten().enumerate() {
            std::thread::spawn(move || serve(s, id as u32 + 1));
        }
    });
    addr
}

fn checkout_checkin(c: &mut Criterion) {
    let addr = stand_in_server();
    let cfg = Config::parse(&format!(
        "[[endpoints]]\nname = \"e\"\nlisten = \"127.0.0.1:0\"\ntarget_group = \"g\"\n\
         [[target_groups]]\nname = \"g\"\ntargets = [\"{addr}\"]\nmax_connections = 8\nmax_idle_connections = 8\n\
         [[users]]\nname = \"app\"\npassword = \"p\"\nbackend_password = \"p\"\n"
    ))
    .expect("bench config");
    let topology = Topology::with_writer("g", &addr.to_string(), BackendAddr::Tcp(addr));
    let group = GroupShared::new(
        &cfg.target_groups[0],
        topology,
        Route::Writer,
        false,
        proxy::tls::BackendTls::disabled(),
    );
    let key = PoolKey::new(
        proxy::secrets::BackendLogin::fixed("app", "p"),
        cap::MULTI_STATEMENTS | cap::MULTI_RESULTS,
        0,
        45,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let pool = CorePool::<TokioNet>::new(group);
    // Warm the pool: four connections logged in and idle.
    local.block_on(&rt, async {
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(pool.borrow(&key, None).await.expect("stand-in login"));
        }
        for c in held {
            pool.checkin_clean(c);
        }
    });
    assert_eq!(pool.idle_count(), 4);

    let mut g = c.benchmark_group("pool");
    g.bench_function("checkout+checkin, warm idle connection", |b| {
        b.iter_custom(|iters| {
            local.block_on(&rt, async {
                let t = Instant::now();
                for _ in 0..iters {
                    let conn = pool.borrow(&key, None).await.expect("idle connection");
                    pool.checkin_clean(conn);
                }
                t.elapsed()
            })
        })
    });
    g.finish();
    // Nothing was opened or lost by the loop.
    assert_eq!(pool.idle_count(), 4);
    assert_eq!(pool.shared.open_connections(), 4);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = checkout_checkin
}
criterion_main!(benches);
