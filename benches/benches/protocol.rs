//! The protocol core on its own: framing, response tracking, login arithmetic.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use proxy::mysql::command::ResponseKind;
use proxy::mysql::consts::cap;
use proxy::mysql::packet::{complete_packet, write_packet};
use proxy::mysql::response::{ResponseTracker, Step};
use proxy::mysql::wire::ok_packet;

/// A text result set of `rows` rows of ~100 bytes, one column, DEPRECATE_EOF style.
fn result_set(rows: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut seq = write_packet(&mut out, 1, &[1]);
    seq = write_packet(
        &mut out,
        seq,
        b"\x03def\x04shop\x01t\x01t\x01c\x01c\x0c\x21\x00\xff\x00\x00\x00\xfd\x00\x00\x00\x00\x00",
    );
    let row: Vec<u8> = std::iter::once(99u8)
        .chain(std::iter::repeat_n(b'x', 99))
        .collect();
    for _ in 0..rows {
        seq = write_packet(&mut out, seq, &row);
    }
    let mut end = ok_packet(2);
    end[0] = 0xfe;
    write_packet(&mut out, seq, &end);
    out
}

fn track(bytes: &[u8]) -> usize {
    let mut t = ResponseTracker::new(ResponseKind::Query, cap::PROTOCOL_41 | cap::DEPRECATE_EOF);
    let mut at = 0;
    let mut packets = 0;
    while let Some(h) = complete_packet(&bytes[at..]) {
        let step = t
            .feed(h, &bytes[at + 4..at + h.total()])
            .expect("valid result set");
        at += h.total();
        packets += 1;
        if step == Step::Done {
            break;
        }
    }
    packets
}

fn benches(c: &mut Criterion) {
    let rs = result_set(10_000);
    let mut g = c.benchmark_group("response");
    g.throughput(Throughput::Bytes(rs.len() as u64));
    g.bench_function("track 10k-row result set", |b| {
        b.iter(|| track(black_box(&rs)))
    });
    g.finish();

    let mut g = c.benchmark_group("framing");
    let payload = vec![7u8; 200];
    g.throughput(Throughput::Elements(1));
    g.bench_function("write 200-byte packet", |b| {
        let mut out = Vec::with_capacity(1 << 16);
        b.iter(|| {
            out.clear();
            write_packet(&mut out, 0, black_box(&payload))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("classification");
    g.throughput(Throughput::Elements(1));
    let q = b"SELECT c FROM sbtest1 WHERE id = 4711 /* point select */";
    g.bench_function("command byte", |b| {
        b.iter(|| proxy::mysql::command::classify(black_box(0x03)))
    });
    g.bench_function("analysis of a point SELECT", |b| {
        b.iter(|| proxy::session::sql::analyze(black_box(q)))
    });
    let upsert = b"INSERT INTO t (id, v) VALUES (?, ?) ON DUPLICATE KEY UPDATE v = VALUES(v)";
    g.bench_function("analysis of an INSERT", |b| {
        b.iter(|| proxy::session::sql::analyze(black_box(upsert)))
    });
    g.finish();

    use proxy::session::state::{plan, BackendSession, ClientState, Needs};
    use proxy::session::uservars::UserValue;
    let mut g = c.benchmark_group("replay planning");
    g.throughput(Throughput::Elements(1));
    let mut backend = BackendSession::default();
    for (k, v) in [
        ("character_set_client", "utf8mb4"),
        ("collation_connection", "utf8mb4_general_ci"),
        ("session_track_schema", "ON"),
    ] {
        backend
            .baseline
            .insert(k.as_bytes().to_vec(), v.as_bytes().to_vec());
    }
    backend.vars = backend.baseline.clone();
    backend.schema = Some(b"shop".to_vec());
    let same = ClientState {
        schema: Some(b"shop".to_vec()),
        ..Default::default()
    };
    g.bench_function("same state (nothing to do)", |b| {
        b.iter(|| plan(black_box(&same), &backend, Needs::default(), true))
    });
    let mut client = ClientState {
        schema: Some(b"shop2".to_vec()),
        ..Default::default()
    };
    client
        .vars
        .insert(b"sql_mode".to_vec(), b"ANSI_QUOTES".to_vec());
    client
        .vars
        .insert(b"time_zone".to_vec(), b"+05:30".to_vec());
    client
        .user_vars
        .insert(b"tenant".to_vec(), UserValue::int("42"));
    g.bench_function(
        "two variables, a user variable and the schema differ",
        |b| b.iter(|| plan(black_box(&client), &backend, Needs::default(), true)),
    );
    g.finish();

    let nonce = proxy::mysql::auth::new_nonce();
    let answer = proxy::mysql::auth::Plugin::Native.scramble(b"app-secret", &nonce);
    c.bench_function("verify mysql_native_password", |b| {
        b.iter(|| {
            proxy::mysql::auth::Plugin::Native.verify(
                b"app-secret",
                black_box(&nonce),
                black_box(&answer),
            )
        })
    });
}

criterion_group!(protocol, benches);
criterion_main!(protocol);
