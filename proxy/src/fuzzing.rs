//! Entry points of the fuzz targets in `fuzz/` (libFuzzer through cargo-fuzz; run them with
//! `cargo xtask fuzz`). Each takes arbitrary bytes and feeds them to the code that reads
//! what clients and databases send; none may panic, whatever the bytes. The tests below
//! replay every kept input (the seed corpus and the input of every crash found, under
//! `fuzz/`) on stable Rust, so that a crash once found stays fixed.

use crate::mysql::command::{classify, may_change_database, ResponseKind};
use crate::mysql::handshake::{parse_auth_switch, ChangeUser, HandshakeResponse, ServerHandshake};
use crate::mysql::packet::{complete_packet, write_packet, Header};
use crate::mysql::response::{ResponseTracker, Step};
use crate::mysql::resultset::{parse_binary_row, parse_text_row, ColumnDef, TextResult};
use crate::mysql::session::{changes, parse_ok, strip_session_track};
use crate::mysql::stmt;
use crate::session::login::{ClientTls, Login, Profile};
use crate::session::state::BackendSession;

/// A target: arbitrary bytes in, no panic.
pub type Target = fn(&[u8]);

/// The targets, by name (the names of `fuzz/fuzz_targets/*.rs` and of their corpora).
pub const TARGETS: &[(&str, Target)] = &[
    ("packet_framing", packet_framing),
    ("handshake", handshake),
    ("client_login", client_login),
    ("command", command),
    ("response", response),
    ("session_tracking", session_tracking),
    ("statement_rewrite", statement_rewrite),
    ("serving", serving),
    ("pg_startup", pg_startup),
    ("pg_relay", pg_relay),
    ("pg_statements", pg_statements),
    ("routing", routing),
];

/// Splits `data` into physical packets as the relays do (a length of 3 bytes, a sequence
/// id, the payload); what is left is an incomplete packet.
fn packets(data: &[u8]) -> Vec<(Header, &[u8])> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(h) = complete_packet(rest) {
        let Some(payload) = rest.get(4..h.total()) else {
            break;
        };
        out.push((h, payload));
        rest = rest.get(h.total()..).unwrap_or_default();
    }
    out
}

/// The first four bytes as a number (capabilities), and the rest.
fn caps_and_rest(data: &[u8]) -> (u32, &[u8]) {
    match data.split_first_chunk::<4>() {
        Some((c, rest)) => (u32::from_le_bytes(*c), rest),
        None => (0, data),
    }
}

/// Packet framing: headers at every offset, and a payload written as packets (split at
/// 16 MiB - 1 as the protocol does) reads back whole.
pub fn packet_framing(data: &[u8]) {
    for i in 0..data.len().min(64) {
        if let Some(h) = data.get(i..).and_then(Header::parse) {
            let _ = (h.total(), h.continues());
        }
    }
    let _ = packets(data);
    let mut out = Vec::new();
    write_packet(&mut out, data.first().copied().unwrap_or(0), data);
    let back: Vec<u8> = packets(&out)
        .into_iter()
        .flat_map(|(_, p)| p.iter().copied())
        .collect();
    assert_eq!(back, data, "a payload written as packets reads back whole");
}

/// What a database sends at login (its greeting, an auth switch) and what a client sends
/// (its handshake response, COM_CHANGE_USER).
pub fn handshake(data: &[u8]) {
    let _ = ServerHandshake::parse(data);
    let _ = HandshakeResponse::parse(data);
    let _ = parse_auth_switch(data);
    let (caps, rest) = caps_and_rest(data);
    let _ = ChangeUser::parse(rest, caps);
    if let Ok(g) = ServerHandshake::parse(data) {
        let _ = ServerHandshake::parse(&g.encode());
    }
    let creds = crate::mysql::backend::Credentials {
        user: "app".into(),
        password: "db".into(),
    };
    for want in [
        crate::mysql::backend::TlsWant::Off,
        crate::mysql::backend::TlsWant::Preferred,
        crate::mysql::backend::TlsWant::Required("verify_full"),
    ] {
        if let Ok(mut g) = crate::mysql::backend::greeted(data, &creds, caps, 0, 45, want) {
            let _ = g.login.on_packet(rest);
        }
        // The same bytes as the server's packets while a connection is opened.
        let mut opening = crate::mysql::backend::Opening::new(&creds, caps, 0, 45, want);
        for (h, p) in packets(data) {
            while opening.poll_send().is_some() {}
            match opening.on_packet(h.seq, p) {
                Ok(crate::mysql::backend::OpenStep::StartTls) => opening.secured(),
                Ok(crate::mysql::backend::OpenStep::Wait) => {}
                Ok(crate::mysql::backend::OpenStep::Open(_)) | Err(_) => break,
            }
        }
    }
}

/// One user, `app`, with any plugin.
fn users() -> crate::auth::Users {
    crate::auth::Users::new(&[crate::config::UserConfig {
        name: "app".into(),
        password: "pw".into(),
        password_hash: None,
        backend_user: None,
        backend_password: "db".into(),
        auth_plugin: crate::config::UserAuthPlugin::Any,
        postgres_auth: Default::default(),
        aws_iam_arns: Vec::new(),
        jwt_subjects: Vec::new(),
        max_database_connections: None,
        weight: 1,
    }])
}

/// The client login machine fed the packets in `data`, as a client would send them.
pub fn client_login(data: &[u8]) {
    let users = users();
    let profile = Profile {
        version: "10.11.0-MariaDB".into(),
        capabilities: u32::MAX,
        ext_capabilities: u32::MAX,
        collation: 45,
    };
    let tls = match data.first().map(|b| b % 3) {
        Some(1) => ClientTls::Offered,
        Some(2) => ClientTls::Required,
        _ => ClientTls::Off,
    };
    let (mut login, _greeting) = Login::start(&profile, 1, [7; 20], "127.0.0.1".into(), tls);
    for (h, payload) in packets(data.get(1..).unwrap_or_default()) {
        let _ = login.on_packet(&users, h.seq, payload);
    }
    // The same packets through the connection phase around it, TLS and tokens answered
    // as the first byte says, the clock moving a second per packet.
    use crate::session::connection_phase::ConnectionPhase;
    let throttle = crate::auth::throttle::LoginThrottle::new(1, std::time::Duration::from_secs(2));
    let now = std::time::Instant::now();
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let timeout = std::time::Duration::from_secs(5);
    let flags = data.first().copied().unwrap_or(0);
    let list = packets(data.get(1..).unwrap_or_default());
    let phase = ConnectionPhase::start(&profile, 1, [7; 20], ip, tls, timeout, now);
    drive_phase(phase, &list, flags, now, &users, &throttle);
    // The first packet as a logged-in session's COM_CHANGE_USER, the rest following it.
    if let Some(((h, first), rest)) = list.split_first() {
        let agreed = crate::session::login::Agreed {
            caps: u32::from_le_bytes([flags, 0xa2, 0x0f, 0x01]),
            ext_caps: 0,
            collation: 45,
        };
        let secure = flags & 16 != 0;
        let phase = ConnectionPhase::change_user(
            first, h.seq, agreed, [7; 20], ip, secure, timeout, now, &users, &throttle,
        );
        drive_phase(phase, rest, flags, now, &users, &throttle);
    }
}

/// Feeds a connection phase `list`, one packet a second, answering TLS and tokens as
/// `flags` says.
fn drive_phase(
    mut phase: crate::session::connection_phase::ConnectionPhase,
    list: &[(Header, &[u8])],
    flags: u8,
    mut now: std::time::Instant,
    users: &crate::auth::Users,
    throttle: &crate::auth::throttle::LoginThrottle,
) {
    use crate::session::connection_phase::{Action, Input};
    for &(h, payload) in list {
        now += std::time::Duration::from_secs(1);
        let input = if phase.wants_packet() {
            Input::Packet {
                seq: h.seq,
                payload,
            }
        } else {
            Input::Timer
        };
        phase.handle(input, now, users, throttle);
        while let Some(a) = phase.poll_action() {
            let answer = match a {
                Action::StartTls => Input::Secured(if flags & 4 == 0 {
                    Ok(())
                } else {
                    Err("no".into())
                }),
                Action::VerifyToken { .. } => Input::TokenVerdict(flags & 8 == 0),
                _ => continue,
            };
            phase.handle(answer, now, users, throttle);
        }
    }
}

/// A command from a client: how it is classified, and what dbproxy reads in its SQL.
pub fn command(data: &[u8]) {
    if let Some(&c) = data.first() {
        let _ = classify(c);
    }
    let _ = may_change_database(data);
    let _ = stmt::stmt_id(data);
    let _ = stmt::execute_opens_cursor(data);
    let sql = data.get(1..).unwrap_or_default();
    let info = crate::session::sql::analyze(sql);
    let _ = crate::session::ReadBack::for_statement(&info, true);
    if let Some(k) = crate::session::kill::parse(sql) {
        let _ = crate::session::kill::decide(&k, crate::clients::FIRST_ID, "app", &NoClients);
    }
    let mut framed = Vec::new();
    write_packet(&mut framed, 0, data);
    if let Some(h) = complete_packet(&framed) {
        let held = data.len().is_multiple_of(2);
        let _ = crate::session::command::dispatch(&framed, h, held);
        let _ = crate::session::command::retryable(&framed, h, held, true, 0);
    }
}

/// A registry with one client of another user, for KILL decisions.
struct NoClients;

impl crate::session::kill::Clients for NoClients {
    type Client = u32;
    fn by_greeting(&self, id: u64) -> Option<u32> {
        u32::try_from(id).ok().filter(|i| i.is_multiple_of(2))
    }
    fn holding_thread(&self, _: u64) -> Option<u32> {
        None
    }
    fn user(&self, c: &u32) -> String {
        if c.is_multiple_of(4) { "app" } else { "other" }.to_string()
    }
    fn id(&self, c: &u32) -> u32 {
        *c
    }
}

/// A database's response to a command of each kind, under the capabilities in `data`'s
/// first bytes, packet by packet; and the same packets as a whole result set.
pub fn response(data: &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let kind = match k % 7 {
        0 => ResponseKind::None,
        1 => ResponseKind::Single,
        2 => ResponseKind::Query,
        3 => ResponseKind::Execute,
        4 => ResponseKind::Prepare,
        5 => ResponseKind::Fetch,
        _ => ResponseKind::FieldList,
    };
    let (caps, rest) = caps_and_rest(rest);
    let list = packets(rest);
    let mut tracker = ResponseTracker::new(kind, caps);
    for (h, p) in &list {
        match tracker.feed(*h, p) {
            Ok(Step::Done) | Err(_) => break,
            Ok(Step::LocalInfile) => tracker.resume_after_infile(),
            Ok(Step::More) => {}
        }
        let _ = (tracker.last_ok(), tracker.status(), tracker.untold_change());
    }
    relay_answer(kind, caps, k, rest);
    backend_script(k, caps, &list);
    let whole: Vec<Vec<u8>> = list.iter().map(|(_, p)| p.to_vec()).collect();
    if let Ok(r) = TextResult::parse(&whole, caps) {
        let _ = r.with_rows(Vec::new(), caps);
    }
    let columns: Vec<ColumnDef> = list
        .iter()
        .filter_map(|(_, p)| ColumnDef::parse(p).ok())
        .collect();
    for (_, p) in &list {
        let _ = parse_text_row(p, columns.len().max(1));
        let _ = parse_binary_row(p, &columns);
    }
}

/// The same packets as the server's side of one of dbproxy's own conversations with it
/// (`backend_script`): set-up, reset, COM_CHANGE_USER, a replay, a prepare in another
/// context.
fn backend_script(flags: u8, caps: u32, list: &[(Header, &[u8])]) {
    use crate::backend_script::{
        Conn, InitSession, Prepare, Progress, Renew, ReplayScript, Runner, Script,
    };
    use crate::mysql::backend::Credentials;
    use crate::session::state::Replay;
    use crate::session::stmts::{BackendStmts, StmtContext, StmtKey};
    use std::sync::Arc;

    fn run<S: Script>(script: S, caps: u32, list: &[(Header, &[u8])]) {
        let mut session = BackendSession {
            schema: Some(b"other".to_vec()),
            ..Default::default()
        };
        let mut stmts = BackendStmts::new(1);
        let mut snapshot = None;
        let mut c = Conn {
            caps,
            collation: 45,
            nonce: b"01234567890123456789",
            session: &mut session,
            stmts: &mut stmts,
            snapshot: &mut snapshot,
        };
        let Ok((mut runner, mut progress)) = Runner::start(script, &mut c) else {
            return;
        };
        for (h, p) in list {
            while runner.poll_send().is_some() {}
            if matches!(progress, Progress::Done(_)) {
                return;
            }
            progress = match runner.on_packet(&mut c, *h, p) {
                Ok(p) => p,
                Err(_) => return,
            };
        }
    }

    let creds = Arc::new(Credentials {
        user: "db".into(),
        password: "pw".into(),
    });
    match flags >> 5 {
        0 => run(InitSession::new("SET x = 1".into(), true), caps, list),
        1 => run(Renew::reset("".into()), caps, list),
        2 => run(Renew::change_user(creds, "SET x = 1".into()), caps, list),
        3 | 4 => {
            let mut plan = Replay::default();
            plan.reset = flags & 0x20 != 0;
            plan.set = Some("SET @a = 1".into());
            plan.next_transaction = vec![b"SET TRANSACTION READ ONLY".to_vec()];
            plan.init_db = Some(b"shop".to_vec());
            let again = plan.clone();
            let replan = move |_: &BackendSession| again.clone();
            run(
                ReplayScript::new(plan, replan, creds, "".into()),
                caps,
                list,
            );
        }
        _ => {
            let context = StmtContext {
                schema: Some(b"shop".to_vec()),
                vars: Default::default(),
            };
            run(
                Prepare::new(StmtKey::new(context, Arc::from(&b"SELECT ?"[..]))),
                caps,
                list,
            );
        }
    }
}

/// The same bytes as the answer to a client's command streaming through
/// (`session::relaying`): passes over every prefix a read could end at, as the relay makes
/// them, with tracking stripped or kept, a prepare's OK_stmt given the client's id, a
/// LOCAL INFILE answered with an empty file, and the statement's timer firing between
/// reads.
fn relay_answer(kind: ResponseKind, caps: u32, flags: u8, data: &[u8]) {
    use crate::mysql::packet::HEADER_LEN;
    use crate::session::answer::PrepareCapture;
    use crate::session::relaying::{Context, Next, Relaying};
    use crate::session::statement_watch::StatementWatch;
    use std::time::{Duration, Instant};
    let Some(user) = users().get(b"app") else {
        return;
    };
    let mut session = crate::session::ClientSession::new(user, caps, 45, None);
    let mut backend = BackendSession::default();
    let mut stmts = crate::session::stmts::BackendStmts::new(4);
    let sql: &[u8] = b"SELECT 1";
    let info = crate::session::sql::analyze(sql);
    let key = crate::session::stmts::StmtKey::new(Default::default(), std::sync::Arc::from(sql));
    let mut capture = PrepareCapture::new(key, std::sync::Arc::new(info.clone()));
    let t0 = Instant::now();
    let second = Duration::from_secs(1);
    let watch = (flags & 0x04 != 0).then(|| StatementWatch::new(second, second, t0));
    let (strip, retryable) = (flags & 0x08 != 0, flags & 0x10 != 0);
    let mut relaying = Relaying::new(kind, caps, strip, retryable, watch);
    // What a pass sees, with the prepare's capture or not.
    macro_rules! cx {
        ($prepare:expr) => {
            Context {
                session: &mut session,
                backend: &mut backend,
                backend_stmts: &mut stmts,
                caps,
                info: &info,
                prepare: $prepare,
            }
        };
    }
    let mut buf = data.to_vec();
    let mut at = 0;
    // Reads of 1, 2, 3, ... bytes: every packet boundary falls inside one some time.
    let mut read = 1;
    while at < buf.len() {
        let end = (at + read).min(buf.len());
        let now = t0 + second * u32::try_from(read).unwrap_or(u32::MAX) / 2;
        read += 1;
        let _ = relaying.on_timer(now);
        let _ = relaying.poll_timeout();
        let Some(pending) = buf.get_mut(at..end) else {
            return;
        };
        let prepare = (kind == ResponseKind::Prepare).then_some(&mut capture);
        let pass = match relaying.on_backend(cx!(prepare), pending) {
            Ok(pass) => pass,
            Err(why) => {
                let _ = relaying.told(&session, &why.to_string());
                return;
            }
        };
        at += pass.bytes;
        match pass.next {
            Next::Read { want } => {
                assert!(want >= 1, "a read of nothing");
                relaying.waiting(now);
            }
            Next::Infile => {
                // The client's file: one packet, then its end.
                let packet = Header {
                    len: HEADER_LEN,
                    seq: 2,
                };
                let _ = relaying.infile_packet(packet);
                if flags & 0x01 != 0 {
                    relaying.infile_send_failed("gone".into());
                }
                let _ = relaying.infile_packet(Header { len: 0, seq: 3 });
                if relaying.infile_done().is_err() {
                    return;
                }
            }
            Next::Done => {
                let _ = relaying.finish(cx!(None));
                return;
            }
        }
        if end == buf.len() && at < end {
            // An incomplete packet at the end: nothing more will come.
            let _ = relaying.backend_closed(None);
            return;
        }
    }
}

/// A client's command served by its flow (`serving`), whatever each step's answer: the
/// flow is chosen by the first byte, the rest is the command's payload and then the
/// answers, one byte each. Whatever comes back, a flow ends within a bounded number of
/// steps and never panics.
pub fn serving(data: &[u8]) {
    use crate::serving::{Cx, Flow, Got, Step};
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (command, answers) = rest.split_at(rest.len().min(usize::from(which >> 4)));
    let Some(user) = users().get(b"app") else {
        return;
    };
    let mut s = crate::session::ClientSession::new(
        user,
        crate::mysql::consts::cap::PROTOCOL_41,
        45,
        Some(b"shop".to_vec()),
    );
    let sql: std::sync::Arc<[u8]> = std::sync::Arc::from(&b"SELECT ?"[..]);
    let key = crate::session::stmts::StmtKey::new(Default::default(), sql.clone());
    let info = std::sync::Arc::new(crate::session::sql::analyze(&sql));
    let cid = s.stmts.add(key.clone(), info.clone(), 1, 1);
    let mut held: Option<BackendSession> = (which & 0x08 != 0).then(BackendSession::default);
    let mut held_stmts = crate::session::stmts::BackendStmts::new(2);
    let mut flow: Box<dyn Flow> = {
        let cx = Cx::new(&mut s, None);
        let mut cx = cx;
        cx.command = command;
        use crate::serving::*;
        match which % 9 {
            0 => Box::new(query::Query::new(
                0,
                command.get(1..).unwrap_or_default(),
                false,
            )),
            1 => Box::new(execute::Execute::new(
                0,
                crate::session::execute::Execute {
                    cid,
                    key,
                    info,
                    needs: Default::default(),
                    cursor: which & 0x80 != 0,
                },
            )),
            2 => Box::new(forward::Forward::new(
                0,
                ResponseKind::Single,
                true,
                which & 0x80 != 0,
            )),
            3 => Box::new(prepare::Prepare::new(0, 4, usize::from(which >> 6))),
            4 => match stmt_command::StatementCommand::new(0, &cx) {
                Ok(f) => Box::new(f),
                Err(f) => Box::new(f),
            },
            5 => Box::new(stmt_command::CloseStatement::new(&cx)),
            6 => Box::new(forward::ResetConnection::new(0)),
            7 => Box::new(connect::Connect::new(2)),
            _ => Box::new(forward::Pong::new(0)),
        }
    };
    let outcome = |b: u8| crate::session::Outcome {
        ending: match b % 3 {
            0 => crate::mysql::response::End::Err,
            1 => crate::mysql::response::End::Ok {
                affected: u64::from(b),
                warnings: u16::from(b & 1),
            },
            _ => crate::mysql::response::End::Rows {
                rows: 1,
                warnings: 0,
            },
        },
        status: Some(u16::from(b) << 4 | 2),
    };
    let mut got = Got::Start;
    let mut answers = answers.iter().copied().chain(std::iter::repeat(0));
    for _ in 0..64 {
        let mut cx = Cx::new(&mut s, held.as_mut());
        cx.held_stmts = cx.held.is_some().then_some(&mut held_stmts);
        cx.command = command;
        let step = flow.next(&mut cx, got).into_owned();
        let b = answers.next().unwrap_or(0);
        let e = || crate::mysql::wire::ErrPacket::new(1146, "42S02", "gone");
        got = match step {
            Step::Done | Step::EndSession => return,
            Step::Borrow if b & 1 == 0 => {
                held = Some(BackendSession::default());
                Got::Lent
            }
            Step::CheckIn | Step::CheckInReset => {
                held = None;
                Got::CheckedIn
            }
            // Any answer at all, to any step: the flow must cope.
            _ => match b % 16 {
                0 => Got::Refused(e()),
                1 => Got::Replayed(crate::session::borrowing::Replayed::Broken("x".into())),
                2 => Got::Replayed(crate::session::borrowing::Replayed::Refused(e())),
                3 => Got::Replayed(crate::session::borrowing::Replayed::Done),
                4 => Got::Sent,
                5 => Got::Dropped,
                6 => Got::Read,
                7 => Got::Relayed(outcome(b >> 4), Default::default()),
                8 => Got::Told,
                9 => Got::AheadDone,
                10 => Got::Captured,
                11 => Got::ReadBack,
                12 => Got::Prepared(if b & 0x10 != 0 { Ok(7) } else { Err(e()) }),
                13 => Got::Built(if b & 0x10 != 0 { Ok(()) } else { Err(e()) }),
                14 => Got::Released(if b & 0x10 != 0 {
                    Ok(None)
                } else {
                    Err("x".into())
                }),
                _ => Got::Answered(b & 0x10 != 0),
            },
        };
    }
    panic!("a flow did not end within 64 steps");
}

/// An OK packet's session-state information, as dbproxy learns a session from it.
pub fn session_tracking(data: &[u8]) {
    let (caps, rest) = caps_and_rest(data);
    let Ok(ok) = parse_ok(rest, caps) else {
        return;
    };
    let _ = strip_session_track(rest, &ok);
    let Some(state) = ok.state.clone().and_then(|r| rest.get(r)) else {
        return;
    };
    if let Ok(list) = changes(state) {
        let Some(user) = users().get(b"app") else {
            return;
        };
        let mut s = crate::session::ClientSession::new(user, caps, 45, None);
        let mut backend = BackendSession::default();
        let info = crate::session::sql::analyze(b"SET @@session.sql_mode = ''");
        let _ = s.learn_tracking(&info, &list, &mut backend);
    }
}

/// COM_STMT_EXECUTE and COM_STMT_BULK_EXECUTE rewritten for a backend statement, with
/// the parameter count and remembered types in `data`'s first bytes.
pub fn statement_rewrite(data: &[u8]) {
    let Some(([p0, p1, t], payload)) = data.split_first_chunk::<3>() else {
        return;
    };
    let params = u16::from_le_bytes([*p0, *p1]) % 512;
    let remembered = (*t & 1 == 1).then(|| vec![*t; 2 * usize::from(params)]);
    let mut client = remembered.clone();
    let mut backend = None;
    let mut out = Vec::new();
    let _ = stmt::rewrite_execute(payload, params, &mut client, &mut backend, 9, &mut out);
    out.clear();
    let _ = stmt::rewrite_bulk(payload, 9, &mut out);
    let mut copy = payload.to_vec();
    stmt::patch_stmt_id(&mut copy, 9);
    let _ = stmt::parse_prepare_ok(payload);
    // The same payload as a client's execute of its one statement (id 1), built for a
    // connection that has it.
    use crate::session::{execute, stmts};
    let Some(user) = users().get(b"app") else {
        return;
    };
    let mut s = crate::session::ClientSession::new(user, 0, 45, None);
    let sql: &[u8] = b"SELECT ?";
    let key = stmts::StmtKey::new(Default::default(), std::sync::Arc::from(sql));
    let info = std::sync::Arc::new(crate::session::sql::analyze(sql));
    s.stmts.add(key.clone(), info, params, 1);
    let mut conn = stmts::BackendStmts::new(2);
    conn.insert(key, 9, params);
    if let Ok(ex) = execute::read(&s, payload) {
        out.clear();
        let _ = execute::build(&mut s, &ex, payload, &mut conn, &mut out);
    }
}

/// PostgreSQL: what a client sends before it is logged in (the startup message or a
/// request in its place, a password, SCRAM's two messages split at the input's first
/// NUL).
pub fn pg_startup(data: &[u8]) {
    use crate::postgres::{frame, messages, scram, startup};
    static VERIFIER: std::sync::LazyLock<scram::Verifier> =
        std::sync::LazyLock::new(|| scram::Verifier::from_password(b"pw", b"salt", 16));
    let _ = startup::parse_startup(data);
    let _ = frame::message(data);
    let _ = messages::parse_password(data);
    let _ = messages::parse_sasl_initial(data);
    let _ = messages::parse_sasl_response(data);
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (first, rest) = data.split_at(split);
    if let Ok((mut login, _)) = scram::ServerLogin::start(&VERIFIER, first, [0; 18]) {
        let _ = login.finish(rest.get(1..).unwrap_or(&[]));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = scram::Verifier::parse(s);
    }
    // The login machine, fed the input in two pieces, each credential in turn.
    use crate::postgres::login::{Credential, Login, Need};
    for (i, secure) in [(0u8, false), (1, true), (2, true)] {
        let mut l = Login::new(secure);
        let mut out = Vec::new();
        if matches!(l.on_bytes(first, &mut out), Need::Tls) {
            l.answer_tls(true, &mut out);
        }
        if matches!(l.on_bytes(&[], &mut out), Need::Identify { .. }) {
            let c = match i {
                0 => Credential::Md5(crate::postgres::md5::stored(b"pw", b"u")),
                1 => Credential::ClearText,
                _ => Credential::Scram(VERIFIER.clone()),
            };
            let _ = l.identified(c, [1; 18], &mut out);
        }
        if matches!(l.on_bytes(rest, &mut out), Need::CheckPassword(_)) {
            let _ = l.password_checked(true, &mut out);
        }
    }
}

/// PostgreSQL: an exchange relayed both ways in pieces: each piece's length comes from
/// its first byte, and pieces alternate between the client's side and the server's. A
/// tracker that refuses bytes is replaced, as the session would drop the connection.
pub fn pg_relay(data: &[u8]) {
    use crate::postgres::tracker::Tracker;
    let mut t = Tracker::default();
    let mut rest = data;
    let mut from_client = true;
    while let Some((&n, tail)) = rest.split_first() {
        let (piece, tail) = tail.split_at(usize::from(n % 64 + 1).min(tail.len()));
        let ok = match from_client {
            true => t.from_client(piece).is_ok(),
            false => t.from_server(piece, |_| {}).is_ok(),
        };
        if !ok {
            t = Tracker::default();
        }
        let _ = t.releasable();
        from_client = !from_client;
        rest = tail;
    }
}

/// PostgreSQL prepared statements (protocol and SQL level) on an exchange, in pieces as
/// in [`pg_relay`]: the client's pieces are renamed and given fixups, the server's have
/// answers dropped; each piece is also read as SQL text, and as a read-back of SQL
/// statements. A piece the exchange refuses starts a new one, as the session would.
pub fn pg_statements(data: &[u8]) {
    use crate::session::pg_statements::{ClientStatements, Exchange, Forward, ServerStatements};
    use crate::session::postgres::{sql_definition, sql_names};
    let mut x = Exchange::default();
    let mut c = ClientStatements::new(1);
    let mut s = ServerStatements::default();
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut rest = data;
    let mut from_client = true;
    while let Some((&n, tail)) = rest.split_first() {
        let (piece, tail) = tail.split_at(usize::from(n % 64 + 1).min(tail.len()));
        let names = sql_names(piece);
        if let Some(name) = names.used.first() {
            let _ = sql_definition(piece, name);
        }
        if n & 0x80 != 0 {
            c.sql.changing(&names);
            let rows = piece.split(|&b| b == b';').filter_map(|r| {
                let (name, source) = r.split_at(r.len().min(3));
                (!name.is_empty()).then_some((name, source))
            });
            let _ = c.sql.read_back(&mut s.sql, rows);
        }
        let ok = if from_client {
            pending.extend_from_slice(piece);
            match x.from_client(&mut c, &mut s, &pending, &mut out, |_| {}) {
                Ok(Forward::AsIs(k) | Forward::Rewritten(k)) => {
                    pending.drain(..k.min(pending.len()));
                    true
                }
                Err(_) => false,
            }
        } else {
            x.from_server(&mut c, &mut s, piece, |_| {}).is_ok()
        };
        if !ok {
            x.reset();
            pending.clear();
        }
        from_client = !from_client;
        rest = tail;
    }
}

/// A split endpoint's reading of what a client sends: the statement classifier and its
/// hints on any text, the causal-position statements, and a position handed over as text,
/// whose text form must read back as the same position and merge into it as a no-op.
pub fn routing(data: &[u8]) {
    use crate::routing::causal::{position_statement, Position};
    use crate::routing::classify;
    let _ = classify::classify(data);
    let _ = classify::hint(data);
    let _ = position_statement(data);
    let Ok(p) = Position::parse(data) else {
        return;
    };
    let text = p.to_text();
    assert_eq!(
        Position::parse(text.as_bytes()).as_ref(),
        Ok(&p),
        "{text:?} does not read back"
    );
    let mut merged = p.clone();
    assert_eq!(merged.merge_text(text.as_bytes()), Ok(()));
    assert_eq!(merged, p, "merging a position into itself changed it");
    let _ = p.wait_sql(250);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Every kept input of every target: the seed corpus and the crashes found
    /// (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`). Every target has seeds of
    /// its own, every directory there names a target, and `fuzz/regressions/` exists (a
    /// target without crashes has no directory in it).
    #[test]
    fn every_kept_input_runs_clean() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let targets: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
        for dir in ["corpus", "regressions"] {
            let entries =
                std::fs::read_dir(fuzz.join(dir)).unwrap_or_else(|e| panic!("fuzz/{dir}: {e}"));
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                assert!(
                    !e.path().is_dir() || targets.contains(&name.as_str()),
                    "fuzz/{dir}/{name} names no fuzz target"
                );
            }
        }
        for (name, target) in TARGETS {
            let mut seeds = 0;
            for dir in ["corpus", "regressions"] {
                let path = fuzz.join(dir).join(name);
                let entries = match std::fs::read_dir(&path) {
                    Ok(entries) => entries,
                    Err(_) if dir == "regressions" => continue,
                    Err(e) => panic!("{}: {e}", path.display()),
                };
                for e in entries.flatten() {
                    let data = std::fs::read(e.path()).unwrap();
                    target(&data);
                    seeds += usize::from(dir == "corpus");
                }
            }
            assert!(seeds > 0, "fuzz/corpus/{name} has no seed");
        }
    }

    /// Each target on small inputs of every shape: empty, one byte of each value, runs.
    #[test]
    fn small_inputs_run_clean() {
        for (_, target) in TARGETS {
            target(&[]);
            for b in 0..=255u8 {
                target(&[b]);
                target(&[b; 9]);
                target(&[b, 0, 0, 0, b, b, b, b]);
            }
        }
    }
}
