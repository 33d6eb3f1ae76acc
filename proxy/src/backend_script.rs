//! What dbproxy says to a backend connection of its own accord, as plain code: setting a
//! session up, resetting it (COM_RESET_CONNECTION or COM_CHANGE_USER), replaying a client's
//! session state, preparing a statement in its context. Whole packets from the server in,
//! packets to send out; no socket and no clock. The async driver in `backend_conn` runs
//! them today, and a worker loop can run them the same way.
//!
//! A [`Script`] sees whole answers ([`Answer`]) and says what comes next ([`Next`]); a
//! [`Runner`] turns that into packets: it collects each answer ([`Collect`], which also
//! records the session changes OK packets report), and drives the login exchange of
//! COM_CHANGE_USER.

use crate::mysql::backend::{Credentials, Login, LoginError, LoginStep};
use crate::mysql::command::ResponseKind;
use crate::mysql::consts::com;
use crate::mysql::packet::Header;
use crate::mysql::response::{ResponseTracker, Step};
use crate::mysql::resultset::{parse_text_row, Packets, TextResult};
use crate::mysql::session::{changes, parse_ok};
use crate::mysql::stmt::parse_prepare_ok;
use crate::mysql::wire::ErrPacket;
use crate::mysql::ProtocolError;
use crate::session::state::{self, BackendSession, Replay};
use crate::session::stmts::{BackendStmts, StmtContext, StmtKey, CONTEXT_VARS};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Run first on every backend session: the server then reports in its OK packets every
/// change of a system variable, of the default schema, and of other session state.
pub const TRACKING_SQL: &str =
    "SET SESSION session_track_schema = ON, session_track_state_change = ON, \
     session_track_system_variables = '*'";

/// The character set variables come from the handshake, not from the global defaults that
/// `SET ... = DEFAULT` restores: assigning them their own values makes session tracking
/// report them, so they enter the baseline.
pub const CHARSET_BASELINE_SQL: &str =
    "SET SESSION character_set_client = @@session.character_set_client, \
     character_set_connection = @@session.character_set_connection, \
     character_set_results = @@session.character_set_results, \
     collation_connection = @@session.collation_connection";

/// Reads every session variable (global-only ones, which any client may change, left out).
pub const SESSION_VARIABLES_SQL: &str =
    "SELECT LOWER(VARIABLE_NAME), SESSION_VALUE FROM information_schema.SYSTEM_VARIABLES \
     WHERE VARIABLE_SCOPE <> 'GLOBAL'";

/// Every session variable of a connection, lowercased name -> value.
pub type Snapshot = BTreeMap<Vec<u8>, Vec<u8>>;

/// What a script reads and changes of the connection it runs on.
pub struct Conn<'a> {
    /// Capabilities negotiated with the server.
    pub caps: u32,
    /// The collation sent at login (COM_CHANGE_USER sends it again).
    pub collation: u8,
    /// The server's login nonce (COM_CHANGE_USER scrambles with it).
    pub nonce: &'a [u8],
    pub session: &'a mut BackendSession,
    pub stmts: &'a mut BackendStmts,
    /// Every session variable right after set-up, kept for the check-in verification.
    pub snapshot: &'a mut Option<Snapshot>,
}

/// Why a script could not go on: the connection is not fit for use.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("protocol error from backend: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Login(#[from] LoginError),
    /// The server refused a statement that sets the session up.
    #[error("backend answered: {0}")]
    Server(ErrPacket),
    #[error("the database sent a packet nobody asked for")]
    Unasked,
}

/// What a script is told.
#[derive(Debug)]
pub enum Answer {
    /// Nothing yet: the script begins.
    Start,
    /// The whole answer to the last [`Next::Command`]: its packets, or the server's ERR.
    Reply(Result<Packets, ErrPacket>),
    /// The COM_CHANGE_USER of [`Next::ChangeUser`] logged in.
    LoggedIn,
    /// The packet of [`Next::Tell`] is on its way (no answer comes).
    Told,
}

/// What a script asks for next.
#[derive(Debug)]
pub enum Next<T> {
    /// Send this command and give its whole answer back.
    Command {
        payload: Vec<u8>,
        kind: ResponseKind,
    },
    /// Send this command, which the server does not answer (COM_STMT_CLOSE).
    Tell(Vec<u8>),
    /// Send this COM_CHANGE_USER and run its login exchange.
    ChangeUser { login: Login, payload: Vec<u8> },
    /// The script is over.
    Done(T),
}

impl<T> Next<T> {
    /// This step as the step of a script that runs this one inside it: what follows its
    /// end is `done(t)`.
    fn then<U>(
        self,
        done: impl FnOnce(T) -> Result<Next<U>, ScriptError>,
    ) -> Result<Next<U>, ScriptError> {
        Ok(match self {
            Next::Command { payload, kind } => Next::Command { payload, kind },
            Next::Tell(p) => Next::Tell(p),
            Next::ChangeUser { login, payload } => Next::ChangeUser { login, payload },
            Next::Done(t) => return done(t),
        })
    }
}

/// A conversation with the server, one answer at a time.
pub trait Script {
    type Output;
    fn next(&mut self, c: &mut Conn<'_>, answer: Answer)
        -> Result<Next<Self::Output>, ScriptError>;
}

/// Where a script is.
#[derive(Debug)]
pub enum Progress<T> {
    /// Waiting for the server's next packet.
    Wait,
    Done(T),
}

/// One answer being collected.
#[derive(Debug)]
pub struct Collect {
    tracker: ResponseTracker,
    caps: u32,
    packets: Vec<Vec<u8>>,
    err: Option<ErrPacket>,
    /// Packets are not kept (an answer read only to be dropped).
    drop_packets: bool,
}

/// What a packet of an answer led to.
#[derive(Debug)]
pub enum Collected {
    More,
    /// The server asked for a LOAD DATA LOCAL file: send it an empty packet (the next
    /// sequence id); its answer follows.
    Infile,
    Done(Result<Packets, ErrPacket>),
}

impl Collect {
    /// Collects the answer to a command of `kind` on a connection negotiated with `caps`.
    pub fn new(kind: ResponseKind, caps: u32) -> Collect {
        Collect {
            tracker: ResponseTracker::new(kind, caps),
            caps,
            packets: Vec::new(),
            err: None,
            drop_packets: false,
        }
    }

    /// Follows the answer to its end without keeping its packets (it ends as
    /// `Done(Ok(Packets(vec![])))` or with the server's ERR).
    pub fn dropping(kind: ResponseKind, caps: u32) -> Collect {
        Collect {
            drop_packets: true,
            ..Collect::new(kind, caps)
        }
    }

    /// Takes one packet; what its OK packets report about the session goes to `session`.
    pub fn feed(
        &mut self,
        session: &mut BackendSession,
        h: Header,
        payload: &[u8],
    ) -> Result<Collected, ProtocolError> {
        if payload.first() == Some(&0xff) && self.err.is_none() {
            self.err = Some(ErrPacket::parse(payload)?);
        }
        let step = self.tracker.feed(h, payload)?;
        if self.tracker.last_ok() {
            apply_ok(session, payload, self.caps)?;
        }
        if !self.drop_packets {
            self.packets.push(payload.to_vec());
        }
        Ok(match step {
            Step::More => Collected::More,
            Step::LocalInfile => {
                // dbproxy never sends LOAD DATA itself: the file is empty.
                self.tracker.resume_after_infile();
                Collected::Infile
            }
            Step::Done => Collected::Done(match self.err.take() {
                Some(e) => Err(e),
                None => Ok(Packets(std::mem::take(&mut self.packets))),
            }),
        })
    }
}

/// Applies the session-tracking information of an OK packet of dbproxy's own statements
/// to `session`.
pub fn apply_ok(
    session: &mut BackendSession,
    payload: &[u8],
    caps: u32,
) -> Result<(), ProtocolError> {
    let ok = parse_ok(payload, caps)?;
    let Some(range) = ok.state else {
        return Ok(());
    };
    let data = payload
        .get(range)
        .ok_or(ProtocolError::Truncated("session state"))?;
    for c in changes(data)? {
        session.apply(&c);
    }
    Ok(())
}

#[derive(Debug)]
enum Waiting {
    Nothing,
    Reply(Collect),
    Login(Login),
}

/// Runs a script: packets to send out ([`Runner::poll_send`]), the server's packets in
/// ([`Runner::on_packet`]).
#[derive(Debug)]
pub struct Runner<S> {
    script: S,
    waiting: Waiting,
    out: VecDeque<(u8, Vec<u8>)>,
}

impl<S: Script> Runner<S> {
    /// Starts `script`: it may be over at once (nothing to say to the server).
    pub fn start(script: S, c: &mut Conn<'_>) -> Result<(Self, Progress<S::Output>), ScriptError> {
        let mut r = Runner {
            script,
            waiting: Waiting::Nothing,
            out: VecDeque::new(),
        };
        let progress = r.advance(c, Answer::Start)?;
        Ok((r, progress))
    }

    /// The next packet to send: its sequence id and payload.
    pub fn poll_send(&mut self) -> Option<(u8, Vec<u8>)> {
        self.out.pop_front()
    }

    /// Takes one whole packet from the server.
    pub fn on_packet(
        &mut self,
        c: &mut Conn<'_>,
        h: Header,
        payload: &[u8],
    ) -> Result<Progress<S::Output>, ScriptError> {
        match &mut self.waiting {
            Waiting::Nothing => Err(ScriptError::Unasked),
            Waiting::Reply(collect) => match collect.feed(c.session, h, payload)? {
                Collected::More => Ok(Progress::Wait),
                Collected::Infile => {
                    self.out.push_back((h.seq.wrapping_add(1), Vec::new()));
                    Ok(Progress::Wait)
                }
                Collected::Done(reply) => {
                    self.waiting = Waiting::Nothing;
                    self.advance(c, Answer::Reply(reply))
                }
            },
            Waiting::Login(login) => match login.on_packet(payload)? {
                LoginStep::Wait => Ok(Progress::Wait),
                LoginStep::Send(p) => {
                    self.out.push_back((h.seq.wrapping_add(1), p));
                    Ok(Progress::Wait)
                }
                LoginStep::Done => {
                    self.waiting = Waiting::Nothing;
                    self.advance(c, Answer::LoggedIn)
                }
            },
        }
    }

    fn advance(
        &mut self,
        c: &mut Conn<'_>,
        mut answer: Answer,
    ) -> Result<Progress<S::Output>, ScriptError> {
        loop {
            match self.script.next(c, answer)? {
                Next::Command { payload, kind } => {
                    self.out.push_back((0, payload));
                    self.waiting = Waiting::Reply(Collect::new(kind, c.caps));
                    return Ok(Progress::Wait);
                }
                Next::Tell(payload) => {
                    self.out.push_back((0, payload));
                    answer = Answer::Told;
                }
                Next::ChangeUser { login, payload } => {
                    self.out.push_back((0, payload));
                    self.waiting = Waiting::Login(login);
                    return Ok(Progress::Wait);
                }
                Next::Done(t) => return Ok(Progress::Done(t)),
            }
        }
    }
}

/// The payload of COM_QUERY for `sql`.
pub fn query_packet(sql: &str) -> Vec<u8> {
    command_packet(com::QUERY, sql.as_bytes())
}

fn command_packet(command: u8, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(body.len() + 1);
    p.push(command);
    p.extend_from_slice(body);
    p
}

fn query<T>(sql: &str) -> Next<T> {
    Next::Command {
        payload: query_packet(sql),
        kind: ResponseKind::Query,
    }
}

/// One command and its whole answer (`Err`: the server's ERR).
#[derive(Debug)]
pub struct Command {
    payload: Option<Vec<u8>>,
    kind: ResponseKind,
}

impl Command {
    pub fn new(payload: Vec<u8>, kind: ResponseKind) -> Command {
        Command {
            payload: Some(payload),
            kind,
        }
    }

    pub fn query(sql: &str) -> Command {
        Command::new(query_packet(sql), ResponseKind::Query)
    }
}

impl Script for Command {
    type Output = Result<Packets, ErrPacket>;
    fn next(
        &mut self,
        _: &mut Conn<'_>,
        answer: Answer,
    ) -> Result<Next<Self::Output>, ScriptError> {
        match (answer, self.payload.take()) {
            (Answer::Start, Some(payload)) => Ok(Next::Command {
                payload,
                kind: self.kind,
            }),
            (Answer::Reply(r), None) => Ok(Next::Done(r)),
            _ => Err(ScriptError::Unasked),
        }
    }
}

/// Switches session tracking on and runs `init_query`; what they set is the baseline.
/// With `snapshot`, also records every session variable (for the check-in verification).
#[derive(Debug)]
pub struct InitSession {
    init_query: Arc<str>,
    snapshot: bool,
    stage: InitStage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InitStage {
    Tracking,
    Charset,
    InitQuery,
    Snapshot,
}

impl InitSession {
    pub fn new(init_query: Arc<str>, snapshot: bool) -> InitSession {
        InitSession {
            init_query,
            snapshot,
            stage: InitStage::Tracking,
        }
    }
}

impl Script for InitSession {
    type Output = ();
    fn next(&mut self, c: &mut Conn<'_>, answer: Answer) -> Result<Next<()>, ScriptError> {
        let packets = match answer {
            Answer::Start => return Ok(query(TRACKING_SQL)),
            Answer::Reply(Ok(p)) => p,
            Answer::Reply(Err(e)) => return Err(ScriptError::Server(e)),
            Answer::LoggedIn | Answer::Told => return Err(ScriptError::Unasked),
        };
        match self.stage {
            InitStage::Tracking => {
                self.stage = InitStage::Charset;
                return Ok(query(CHARSET_BASELINE_SQL));
            }
            InitStage::Charset if !self.init_query.is_empty() => {
                self.stage = InitStage::InitQuery;
                return Ok(query(&self.init_query));
            }
            InitStage::Charset | InitStage::InitQuery => {
                c.session.baseline = c.session.vars.clone();
                if self.snapshot {
                    self.stage = InitStage::Snapshot;
                    return Ok(query(SESSION_VARIABLES_SQL));
                }
            }
            InitStage::Snapshot => *c.snapshot = Some(session_variables(&packets, c.caps)?),
        }
        Ok(Next::Done(()))
    }
}

/// The rows of [`SESSION_VARIABLES_SQL`].
pub fn session_variables(packets: &Packets, caps: u32) -> Result<Snapshot, ProtocolError> {
    let r = TextResult::parse(&packets.0, caps)?;
    let mut out = BTreeMap::new();
    for row in &r.rows {
        if let [Some(n), v] = parse_text_row(row, 2)?.as_slice() {
            out.insert(n.to_vec(), v.unwrap_or_default().to_vec());
        }
    }
    Ok(out)
}

/// A session set up again after what cleared it: the script that cleared it, then
/// [`InitSession`].
#[derive(Debug)]
enum Renewal {
    Clearing,
    Init(InitSession),
}

impl Renewal {
    /// The clearing step is over: forget what the session held, and set it up again.
    fn cleared(
        &mut self,
        c: &mut Conn<'_>,
        init_query: &Arc<str>,
        keep_schema: bool,
    ) -> Result<Next<()>, ScriptError> {
        c.session.reset(keep_schema);
        c.stmts.clear();
        let mut init = InitSession::new(init_query.clone(), c.snapshot.is_some());
        let next = init.next(c, Answer::Start);
        *self = Renewal::Init(init);
        next
    }
}

/// A session cleared, then set up again ([`InitSession`]): everything a client left behind
/// (transaction, locks, variables, temporary tables, prepared statements) goes.
#[derive(Debug)]
pub struct Renew {
    how: Clearing,
    init_query: Arc<str>,
    stage: Renewal,
}

#[derive(Debug)]
enum Clearing {
    /// COM_RESET_CONNECTION: the default database stays (MariaDB keeps it).
    ResetConnection,
    /// COM_CHANGE_USER to the same backend user with no database: the default database
    /// goes too.
    ChangeUser(Arc<Credentials>),
}

impl Renew {
    /// With COM_RESET_CONNECTION.
    pub fn reset(init_query: Arc<str>) -> Renew {
        Renew {
            how: Clearing::ResetConnection,
            init_query,
            stage: Renewal::Clearing,
        }
    }

    /// With COM_CHANGE_USER as `creds`.
    pub fn change_user(creds: Arc<Credentials>, init_query: Arc<str>) -> Renew {
        Renew {
            how: Clearing::ChangeUser(creds),
            init_query,
            stage: Renewal::Clearing,
        }
    }
}

impl Script for Renew {
    type Output = ();
    fn next(&mut self, c: &mut Conn<'_>, answer: Answer) -> Result<Next<()>, ScriptError> {
        match (&mut self.stage, &self.how, answer) {
            (Renewal::Init(init), _, answer) => init.next(c, answer),
            (Renewal::Clearing, Clearing::ResetConnection, Answer::Start) => Ok(Next::Command {
                payload: vec![com::RESET_CONNECTION],
                kind: ResponseKind::Single,
            }),
            (Renewal::Clearing, Clearing::ChangeUser(creds), Answer::Start) => {
                let (login, payload) = Login::change_user(c.nonce, creds, c.caps, c.collation);
                Ok(Next::ChangeUser { login, payload })
            }
            (Renewal::Clearing, Clearing::ResetConnection, Answer::Reply(Ok(_))) => {
                self.stage.cleared(c, &self.init_query, true)
            }
            (Renewal::Clearing, Clearing::ChangeUser(_), Answer::LoggedIn) => {
                self.stage.cleared(c, &self.init_query, false)
            }
            (Renewal::Clearing, _, Answer::Reply(Err(e))) => Err(ScriptError::Server(e)),
            (Renewal::Clearing, _, _) => Err(ScriptError::Unasked),
        }
    }
}

/// Gives the connection a context: one SET, then a default database. Over with `Err` when
/// the server refuses either (the connection itself is fine).
#[derive(Debug, Default)]
pub struct Switch {
    set: Option<String>,
    db: Option<Vec<u8>>,
    /// The database asked for, while its COM_INIT_DB runs.
    selecting: Option<Vec<u8>>,
}

impl Switch {
    pub fn new(set: Option<String>, db: Option<Vec<u8>>) -> Switch {
        Switch {
            set,
            db,
            selecting: None,
        }
    }

    /// Makes `name` the default database (nothing to do when it is already).
    pub fn database(name: Vec<u8>) -> Switch {
        Switch::new(None, Some(name))
    }
}

impl Script for Switch {
    type Output = Result<(), ErrPacket>;
    fn next(
        &mut self,
        c: &mut Conn<'_>,
        answer: Answer,
    ) -> Result<Next<Self::Output>, ScriptError> {
        match answer {
            Answer::Start => {}
            Answer::Reply(Ok(_)) => {
                if let Some(db) = self.selecting.take() {
                    c.session.schema = Some(db);
                }
            }
            Answer::Reply(Err(e)) => return Ok(Next::Done(Err(e))),
            Answer::LoggedIn | Answer::Told => return Err(ScriptError::Unasked),
        }
        if let Some(set) = self.set.take() {
            return Ok(query(&set));
        }
        match self.db.take() {
            Some(db) if c.session.schema.as_deref() != Some(&db[..]) => {
                let payload = command_packet(com::INIT_DB, &db);
                self.selecting = Some(db);
                Ok(Next::Command {
                    payload,
                    kind: ResponseKind::Single,
                })
            }
            _ => Ok(Next::Done(Ok(()))),
        }
    }
}

/// Runs a client's [`Replay`] plan. A plan that needs a reset first (COM_CHANGE_USER, which
/// clears everything) is planned again afterwards with `replan`. Over with `Err` when the
/// server refuses a step (e.g. the client's database was dropped).
pub struct ReplayScript<F> {
    plan: Replay,
    replan: F,
    stage: ReplayStage,
}

enum ReplayStage {
    Start,
    Resetting(Renew),
    /// The SET and then each `SET TRANSACTION` (by index) sent.
    Statements(usize),
    Database(Switch),
}

impl<F: FnMut(&BackendSession) -> Replay> ReplayScript<F> {
    pub fn new(
        plan: Replay,
        replan: F,
        creds: Arc<Credentials>,
        init_query: Arc<str>,
    ) -> ReplayScript<F> {
        let stage = if plan.reset {
            ReplayStage::Resetting(Renew::change_user(creds, init_query))
        } else {
            ReplayStage::Start
        };
        ReplayScript {
            plan,
            replan,
            stage,
        }
    }

    /// The plan's statements from the `i`th on (0: its SET, then `SET TRANSACTION`s).
    fn statements_from(
        &mut self,
        c: &mut Conn<'_>,
        mut i: usize,
    ) -> Result<Next<Result<(), ErrPacket>>, ScriptError> {
        if i == 0 {
            if let Some(set) = &self.plan.set {
                self.stage = ReplayStage::Statements(1);
                return Ok(query(set));
            }
            i = 1;
        }
        if let Some(tx) = self.plan.next_transaction.get(i - 1) {
            self.stage = ReplayStage::Statements(i + 1);
            return Ok(Next::Command {
                payload: command_packet(com::QUERY, tx),
                kind: ResponseKind::Query,
            });
        }
        self.plan.done(c.session);
        let Some(db) = self.plan.init_db.take() else {
            return Ok(Next::Done(Ok(())));
        };
        let mut switch = Switch::database(db);
        let next = switch.next(c, Answer::Start);
        self.stage = ReplayStage::Database(switch);
        next
    }
}

impl<F: FnMut(&BackendSession) -> Replay> Script for ReplayScript<F> {
    type Output = Result<(), ErrPacket>;
    fn next(
        &mut self,
        c: &mut Conn<'_>,
        answer: Answer,
    ) -> Result<Next<Self::Output>, ScriptError> {
        match &mut self.stage {
            ReplayStage::Start => self.statements_from(c, 0),
            ReplayStage::Resetting(change) => change.next(c, answer)?.then(|()| {
                self.plan = (self.replan)(c.session);
                self.statements_from(c, 0)
            }),
            ReplayStage::Statements(i) => match answer {
                Answer::Reply(Ok(_)) => {
                    let i = *i;
                    self.statements_from(c, i)
                }
                Answer::Reply(Err(e)) => Ok(Next::Done(Err(e))),
                _ => Err(ScriptError::Unasked),
            },
            ReplayStage::Database(switch) => switch.next(c, answer),
        }
    }
}

/// Makes sure the statement `key` is prepared on the connection, in the context its client
/// prepared it in (default schema, sql_mode, character sets); gives the server's id. The
/// connection goes back to the context it had (a connection without a default schema keeps
/// the one it had to select). Over with `Err` when the server refuses.
#[derive(Debug)]
pub struct Prepare {
    key: Arc<StmtKey>,
    stage: PrepareStage,
    /// The context to return to, while in the statement's.
    back: Option<StmtContext>,
    /// The server's answer to the prepare (told once the connection is back in its own
    /// context, a refusal too).
    prepared: Option<Result<u32, ErrPacket>>,
}

#[derive(Debug)]
enum PrepareStage {
    Start,
    Into(Switch),
    Preparing,
    Closing,
    Back(Switch),
}

impl Prepare {
    pub fn new(key: Arc<StmtKey>) -> Prepare {
        Prepare {
            key,
            stage: PrepareStage::Start,
            back: None,
            prepared: None,
        }
    }

    fn prepare(&mut self) -> Next<Result<u32, ErrPacket>> {
        self.stage = PrepareStage::Preparing;
        Next::Command {
            payload: command_packet(com::STMT_PREPARE, &self.key.sql),
            kind: ResponseKind::Prepare,
        }
    }

    /// Prepared: back to the connection's own context, if it left it.
    fn go_back(&mut self, c: &mut Conn<'_>) -> Result<Next<Result<u32, ErrPacket>>, ScriptError> {
        let switch = self
            .back
            .take()
            .and_then(|back| state::context_switch(&back, c.session));
        let Some((set, db)) = switch else {
            return self.finishing(Next::Done(Ok(())));
        };
        let mut switch = Switch::new(set, db);
        let next = switch.next(c, Answer::Start)?;
        self.stage = PrepareStage::Back(switch);
        self.finishing(next)
    }

    /// A step of a context switch, as this script's: once it is over, the prepare's answer
    /// (a switch the server refused is the answer instead).
    fn finishing(
        &mut self,
        next: Next<Result<(), ErrPacket>>,
    ) -> Result<Next<Result<u32, ErrPacket>>, ScriptError> {
        next.then(|switched| {
            Ok(Next::Done(switched.and_then(|()| {
                self.prepared.take().unwrap_or(Err(ErrPacket::new(
                    crate::mysql::consts::errcode::ER_UNKNOWN_STMT_HANDLER,
                    "HY000",
                    "(dbproxy) the statement was not prepared",
                )))
            })))
        })
    }
}

impl Script for Prepare {
    type Output = Result<u32, ErrPacket>;
    fn next(
        &mut self,
        c: &mut Conn<'_>,
        answer: Answer,
    ) -> Result<Next<Self::Output>, ScriptError> {
        match &mut self.stage {
            PrepareStage::Start => {
                if let Some(s) = c.stmts.get_mut(&self.key) {
                    return Ok(Next::Done(Ok(s.id)));
                }
                let Some((set, db)) = state::context_switch(&self.key.context, c.session) else {
                    return Ok(self.prepare());
                };
                self.back = Some(StmtContext {
                    schema: c.session.schema.clone(),
                    vars: CONTEXT_VARS.map(|n| c.session.var(n).map(<[u8]>::to_vec)),
                });
                let mut switch = Switch::new(set, db);
                match switch.next(c, Answer::Start)? {
                    Next::Done(Ok(())) => Ok(self.prepare()),
                    other => {
                        self.stage = PrepareStage::Into(switch);
                        self.finishing(other)
                    }
                }
            }
            PrepareStage::Into(switch) => match switch.next(c, answer)? {
                Next::Done(Ok(())) => Ok(self.prepare()),
                other => self.finishing(other),
            },
            PrepareStage::Preparing => {
                let packets = match answer {
                    Answer::Reply(Ok(p)) => p,
                    Answer::Reply(Err(e)) => {
                        // Refused (a table gone, bad SQL): the connection goes back to its
                        // own context all the same.
                        self.prepared = Some(Err(e));
                        return self.go_back(c);
                    }
                    _ => return Err(ScriptError::Unasked),
                };
                let first = packets
                    .0
                    .first()
                    .ok_or(ProtocolError::Malformed("empty reply to COM_STMT_PREPARE"))?;
                let (id, _columns, params) = parse_prepare_ok(first)?;
                self.prepared = Some(Ok(id));
                match c.stmts.insert(self.key.clone(), id, params) {
                    Some(evicted) => {
                        self.stage = PrepareStage::Closing;
                        Ok(Next::Tell(command_packet(
                            com::STMT_CLOSE,
                            &evicted.to_le_bytes(),
                        )))
                    }
                    None => self.go_back(c),
                }
            }
            PrepareStage::Closing => self.go_back(c),
            PrepareStage::Back(switch) => {
                let next = switch.next(c, answer)?;
                self.finishing(next)
            }
        }
    }
}

/// What a connection needs before it goes back to the pool ([`crate::session::Release`]):
/// the client's warning list read back (`SHOW WARNINGS`; a refusal only loses the list),
/// then the statements that clear one-shots meant for that client. Gives the warning list.
#[derive(Debug)]
pub struct Release {
    capture_warnings: bool,
    statements: std::vec::IntoIter<String>,
    /// The SHOW WARNINGS is answered next.
    capturing: bool,
    warnings: Option<TextResult>,
}

impl Release {
    pub fn new(steps: crate::session::Release) -> Release {
        Release {
            capture_warnings: steps.capture_warnings,
            statements: steps.statements.into_iter(),
            capturing: false,
            warnings: None,
        }
    }
}

impl Script for Release {
    type Output = Option<TextResult>;
    fn next(
        &mut self,
        c: &mut Conn<'_>,
        answer: Answer,
    ) -> Result<Next<Self::Output>, ScriptError> {
        match answer {
            Answer::Start if self.capture_warnings => {
                self.capturing = true;
                return Ok(query("SHOW WARNINGS"));
            }
            Answer::Start => {}
            Answer::Reply(reply) if std::mem::take(&mut self.capturing) => match reply {
                Ok(p) => self.warnings = Some(TextResult::parse(&p.0, c.caps)?),
                Err(e) => tracing::warn!("SHOW WARNINGS failed: {e}"),
            },
            Answer::Reply(Ok(_)) => {}
            Answer::Reply(Err(e)) => return Err(ScriptError::Server(e)),
            Answer::LoggedIn | Answer::Told => return Err(ScriptError::Unasked),
        }
        Ok(match self.statements.next() {
            Some(sql) => query(&sql),
            None => Next::Done(self.warnings.take()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::consts::cap;
    use crate::mysql::resultset::{encode_text_row, ColumnDef};
    use crate::mysql::wire::ok_packet;

    /// Protocol 4.1 with session tracking and classic EOF packets.
    const CAPS: u32 = cap::PROTOCOL_41 | cap::SESSION_TRACK | cap::PLUGIN_AUTH;

    /// A backend connection's record, and what the script sent on it.
    struct Server {
        session: BackendSession,
        stmts: BackendStmts,
        snapshot: Option<Snapshot>,
        sent: Vec<(u8, Vec<u8>)>,
    }

    impl Server {
        fn new() -> Server {
            Server {
                session: BackendSession::default(),
                stmts: BackendStmts::new(4),
                snapshot: None,
                sent: Vec::new(),
            }
        }

        fn conn(&mut self) -> Conn<'_> {
            Conn {
                caps: CAPS,
                collation: 45,
                nonce: b"01234567890123456789",
                session: &mut self.session,
                stmts: &mut self.stmts,
                snapshot: &mut self.snapshot,
            }
        }

        fn start<S: Script>(&mut self, script: S) -> (Runner<S>, Progress<S::Output>) {
            let (mut r, p) = Runner::start(script, &mut self.conn()).unwrap();
            self.drain(&mut r);
            (r, p)
        }

        fn drain<S: Script>(&mut self, r: &mut Runner<S>) {
            while let Some(p) = r.poll_send() {
                self.sent.push(p);
            }
        }

        /// The server answers the last command with `packets` (sequence ids from 1).
        fn answer<S: Script>(
            &mut self,
            r: &mut Runner<S>,
            packets: &[Vec<u8>],
        ) -> Result<Progress<S::Output>, ScriptError> {
            let mut progress = Progress::Wait;
            for (i, p) in packets.iter().enumerate() {
                let h = Header {
                    len: p.len(),
                    seq: i as u8 + 1,
                };
                progress = r.on_packet(&mut self.conn(), h, p)?;
                self.drain(r);
            }
            Ok(progress)
        }

        /// The SQL text of every COM_QUERY sent, in order.
        fn queries(&self) -> Vec<String> {
            self.sent
                .iter()
                .filter(|(_, p)| p.first() == Some(&com::QUERY))
                .map(|(_, p)| String::from_utf8_lossy(&p[1..]).into_owned())
                .collect()
        }
    }

    /// An OK packet reporting system variables (name, value) and maybe a new schema.
    fn ok_reporting(vars: &[(&str, &str)], schema: Option<&str>) -> Vec<u8> {
        fn lenenc(out: &mut Vec<u8>, b: &[u8]) {
            out.push(b.len() as u8);
            out.extend_from_slice(b);
        }
        let mut state = Vec::new();
        for (n, v) in vars {
            let mut entry = Vec::new();
            lenenc(&mut entry, n.as_bytes());
            lenenc(&mut entry, v.as_bytes());
            state.push(0); // SESSION_TRACK_SYSTEM_VARIABLES
            lenenc(&mut state, &entry);
        }
        if let Some(s) = schema {
            let mut entry = Vec::new();
            lenenc(&mut entry, s.as_bytes());
            state.push(1); // SESSION_TRACK_SCHEMA
            lenenc(&mut state, &entry);
        }
        let mut p = vec![0, 0, 0, 0x02, 0x40, 0, 0, 0];
        lenenc(&mut p, &state);
        p
    }

    fn ok() -> Vec<u8> {
        ok_packet(2)
    }

    fn err(code: u16, msg: &str) -> Vec<u8> {
        ErrPacket::new(code, "42000", msg).encode()
    }

    fn eof() -> Vec<u8> {
        vec![0xfe, 0, 0, 2, 0]
    }

    /// A text result set of two columns.
    fn two_columns(rows: &[(&str, &str)]) -> Vec<Vec<u8>> {
        let col = |name: &str| {
            ColumnDef {
                schema: Vec::new(),
                table: Vec::new(),
                org_table: Vec::new(),
                name: name.as_bytes().to_vec(),
                org_name: Vec::new(),
                charset: 33,
                length: 64,
                column_type: 253,
                flags: 0,
                decimals: 0,
            }
            .encode()
        };
        let mut out = vec![vec![2], col("n"), col("v"), eof()];
        for (n, v) in rows {
            out.push(encode_text_row([Some(n.as_bytes()), Some(v.as_bytes())]));
        }
        out.push(eof());
        out
    }

    fn prepare_ok(id: u32) -> Vec<u8> {
        let mut p = vec![0];
        p.extend_from_slice(&id.to_le_bytes());
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        p
    }

    fn key(schema: &str, sql: &str) -> Arc<StmtKey> {
        StmtKey::new(
            StmtContext {
                schema: Some(schema.as_bytes().to_vec()),
                vars: Default::default(),
            },
            sql.as_bytes().into(),
        )
    }

    #[test]
    fn a_session_is_set_up_and_its_variables_become_the_baseline() {
        let mut s = Server::new();
        s.snapshot = None;
        let (mut r, p) = s.start(InitSession::new("SET time_zone = '+00:00'".into(), true));
        assert!(matches!(p, Progress::Wait));
        s.answer(&mut r, &[ok()]).unwrap();
        s.answer(
            &mut r,
            &[ok_reporting(&[("character_set_client", "utf8mb4")], None)],
        )
        .unwrap();
        s.answer(&mut r, &[ok_reporting(&[("time_zone", "+00:00")], None)])
            .unwrap();
        let p = s
            .answer(
                &mut r,
                &two_columns(&[("sql_mode", "STRICT"), ("time_zone", "+00:00")]),
            )
            .unwrap();
        assert!(matches!(p, Progress::Done(())));
        assert_eq!(
            s.queries(),
            [
                TRACKING_SQL,
                CHARSET_BASELINE_SQL,
                "SET time_zone = '+00:00'",
                SESSION_VARIABLES_SQL
            ]
        );
        assert_eq!(s.session.baseline, s.session.vars);
        assert_eq!(
            s.session.baseline.get(&b"time_zone"[..]).map(Vec::as_slice),
            Some(&b"+00:00"[..])
        );
        let snapshot = s.snapshot.expect("asked for");
        assert_eq!(
            snapshot.get(&b"sql_mode"[..]).map(Vec::as_slice),
            Some(&b"STRICT"[..])
        );
    }

    #[test]
    fn a_refused_init_query_fails_the_set_up() {
        let mut s = Server::new();
        let (mut r, _) = s.start(InitSession::new("SET bogus = 1".into(), false));
        s.answer(&mut r, &[ok()]).unwrap();
        s.answer(&mut r, &[ok()]).unwrap();
        let e = s.answer(&mut r, &[err(1193, "Unknown system variable 'bogus'")]);
        assert!(
            matches!(&e, Err(ScriptError::Server(x)) if x.code == 1193),
            "{e:?}"
        );
        // Without an init_query, the set-up is two statements.
        let mut s = Server::new();
        let (mut r, _) = s.start(InitSession::new("".into(), false));
        s.answer(&mut r, &[ok()]).unwrap();
        assert!(matches!(s.answer(&mut r, &[ok()]), Ok(Progress::Done(()))));
        assert_eq!(s.queries().len(), 2);
    }

    #[test]
    fn a_reset_keeps_the_schema_and_forgets_everything_else() {
        let mut s = Server::new();
        s.session.schema = Some(b"shop".to_vec());
        s.session.vars.insert(b"sql_mode".to_vec(), b"".to_vec());
        s.stmts.insert(key("shop", "SELECT 1"), 7, 0);
        s.snapshot = Some(Snapshot::new());
        let (mut r, _) = s.start(Renew::reset("".into()));
        assert_eq!(s.sent, [(0, vec![com::RESET_CONNECTION])]);
        s.answer(&mut r, &[ok()]).unwrap();
        assert!(s.stmts.is_empty(), "the server dropped its statements");
        assert!(s.session.vars.is_empty());
        assert_eq!(s.session.schema.as_deref(), Some(&b"shop"[..]));
        s.answer(&mut r, &[ok()]).unwrap();
        let p = s.answer(&mut r, &[ok()]).unwrap();
        assert!(matches!(p, Progress::Wait), "the snapshot is taken again");
        let p = s.answer(&mut r, &two_columns(&[])).unwrap();
        assert!(matches!(p, Progress::Done(())));
        // A refused reset leaves the connection unfit.
        let mut s = Server::new();
        let (mut r, _) = s.start(Renew::reset("".into()));
        let e = s.answer(&mut r, &[err(1047, "Unknown command")]);
        assert!(matches!(e, Err(ScriptError::Server(_))), "{e:?}");
    }

    #[test]
    fn change_user_follows_an_auth_switch_then_clears_the_schema() {
        let mut s = Server::new();
        s.session.schema = Some(b"shop".to_vec());
        let creds = Arc::new(Credentials {
            user: "db".into(),
            password: "pw".into(),
        });
        let (mut r, _) = s.start(Renew::change_user(creds, "".into()));
        assert_eq!(s.sent[0].1.first(), Some(&com::CHANGE_USER));
        let mut switch = b"\xfemysql_native_password\0".to_vec();
        switch.extend_from_slice(b"abcdefghijabcdefghij\0");
        assert!(matches!(s.answer(&mut r, &[switch]), Ok(Progress::Wait)));
        let (seq, scramble) = s.sent.last().unwrap();
        assert_eq!(
            (*seq, scramble.len()),
            (2, 20),
            "answered at the next sequence id"
        );
        // The server's OK to the login comes at sequence id 3.
        let h = Header { len: 7, seq: 3 };
        let p = r.on_packet(&mut s.conn(), h, &ok()).unwrap();
        s.drain(&mut r);
        assert!(matches!(p, Progress::Wait));
        assert_eq!(s.session.schema, None);
        assert_eq!(s.queries(), [TRACKING_SQL]);
        // A refused login is a failure of the connection.
        let mut s = Server::new();
        let creds = Arc::new(Credentials {
            user: "db".into(),
            password: "old".into(),
        });
        let (mut r, _) = s.start(Renew::change_user(creds, "".into()));
        let e = s.answer(&mut r, &[err(1045, "Access denied")]);
        assert!(
            matches!(e, Err(ScriptError::Login(LoginError::Refused(_)))),
            "{e:?}"
        );
    }

    #[test]
    fn a_replay_runs_its_statements_in_order_and_stops_at_a_refusal() {
        let creds = Arc::new(Credentials {
            user: "db".into(),
            password: "pw".into(),
        });
        let mut plan = Replay::default();
        plan.set = Some("SET @a = 1".into());
        plan.next_transaction = vec![b"SET TRANSACTION READ ONLY".to_vec()];
        plan.init_db = Some(b"shop".to_vec());
        let never = |_: &BackendSession| -> Replay { panic!("no reset, no new plan") };
        let script = || ReplayScript::new(plan.clone(), never, creds.clone(), "".into());
        let mut s = Server::new();
        let (mut r, _) = s.start(script());
        s.answer(&mut r, &[ok()]).unwrap();
        s.answer(&mut r, &[ok()]).unwrap();
        assert_eq!(s.sent.last().unwrap().1, b"\x02shop", "COM_INIT_DB");
        let p = s.answer(&mut r, &[ok()]).unwrap();
        assert!(matches!(p, Progress::Done(Ok(()))), "{p:?}");
        assert_eq!(s.queries(), ["SET @a = 1", "SET TRANSACTION READ ONLY"]);
        assert_eq!(s.session.schema.as_deref(), Some(&b"shop"[..]));

        // The database was dropped: the refusal is the outcome, the connection is fine.
        let mut s = Server::new();
        let (mut r, _) = s.start(script());
        s.answer(&mut r, &[ok()]).unwrap();
        s.answer(&mut r, &[ok()]).unwrap();
        let p = s
            .answer(&mut r, &[err(1049, "Unknown database 'shop'")])
            .unwrap();
        assert!(matches!(p, Progress::Done(Err(e)) if e.code == 1049));
        assert_eq!(s.session.schema, None);

        // A reset first (COM_CHANGE_USER), then the plan made for the cleared connection.
        let mut reset = Replay::default();
        reset.reset = true;
        let mut s = Server::new();
        s.session.schema = Some(b"old".to_vec());
        let replan = |b: &BackendSession| {
            assert_eq!(b.schema, None, "planned again after the reset");
            let mut p = Replay::default();
            p.set = Some("SET @b = 2".into());
            p
        };
        let (mut r, _) = s.start(ReplayScript::new(reset, replan, creds, "".into()));
        s.answer(&mut r, &[ok()]).unwrap(); // the login
        s.answer(&mut r, &[ok()]).unwrap(); // tracking
        s.answer(&mut r, &[ok()]).unwrap(); // character sets
        let p = s.answer(&mut r, &[ok()]).unwrap();
        assert!(matches!(p, Progress::Done(Ok(()))), "{p:?}");
        assert_eq!(
            s.queries(),
            [TRACKING_SQL, CHARSET_BASELINE_SQL, "SET @b = 2"]
        );
    }

    #[test]
    fn a_statement_is_prepared_in_its_context_and_the_connection_goes_back() {
        let mut s = Server::new();
        s.session.schema = Some(b"other".to_vec());
        let k = key("shop", "SELECT ?");
        let (mut r, _) = s.start(Prepare::new(k.clone()));
        assert_eq!(s.sent.last().unwrap().1, b"\x02shop");
        s.answer(&mut r, &[ok()]).unwrap();
        assert_eq!(s.sent.last().unwrap().1, b"\x16SELECT ?");
        s.answer(&mut r, &[prepare_ok(41)]).unwrap();
        assert_eq!(
            s.sent.last().unwrap().1,
            b"\x02other",
            "back to its own schema"
        );
        let p = s.answer(&mut r, &[ok()]).unwrap();
        assert!(matches!(p, Progress::Done(Ok(41))), "{p:?}");
        assert_eq!(s.session.schema.as_deref(), Some(&b"other"[..]));
        // Prepared already: nothing is sent.
        let before = s.sent.len();
        let (_, p) = s.start(Prepare::new(k));
        assert!(matches!(p, Progress::Done(Ok(41))));
        assert_eq!(s.sent.len(), before);
    }

    #[test]
    fn a_refused_prepare_still_takes_the_connection_back_to_its_context() {
        let mut s = Server::new();
        s.session.schema = Some(b"other".to_vec());
        let (mut r, _) = s.start(Prepare::new(key("shop", "SELECT nope")));
        s.answer(&mut r, &[ok()]).unwrap();
        let p = s.answer(&mut r, &[err(1054, "Unknown column")]).unwrap();
        assert!(matches!(p, Progress::Wait), "{p:?}");
        assert_eq!(
            s.sent.last().unwrap().1,
            b"\x02other",
            "back to its own schema"
        );
        let p = s.answer(&mut r, &[ok()]).unwrap();
        assert!(
            matches!(&p, Progress::Done(Err(e)) if e.code == 1054),
            "{p:?}"
        );
        assert_eq!(s.session.schema.as_deref(), Some(&b"other"[..]));
    }

    #[test]
    fn a_statement_pushed_out_of_the_cache_is_closed_on_the_server() {
        let mut s = Server::new();
        s.stmts = BackendStmts::new(1);
        s.session.schema = Some(b"shop".to_vec());
        s.stmts.insert(key("shop", "SELECT 1"), 5, 0);
        let (mut r, _) = s.start(Prepare::new(key("shop", "SELECT 2")));
        let p = s.answer(&mut r, &[prepare_ok(6)]).unwrap();
        assert!(matches!(p, Progress::Done(Ok(6))), "{p:?}");
        let mut close = vec![com::STMT_CLOSE];
        close.extend_from_slice(&5u32.to_le_bytes());
        assert_eq!(s.sent.last(), Some(&(0, close)));
        // A refused prepare leaves the cache as it was.
        let (mut r, _) = s.start(Prepare::new(key("shop", "SELECT nope")));
        let p = s.answer(&mut r, &[err(1054, "Unknown column")]).unwrap();
        assert!(matches!(p, Progress::Done(Err(e)) if e.code == 1054));
        assert_eq!(s.stmts.len(), 1);
    }

    #[test]
    fn a_file_request_gets_an_empty_file_and_stray_packets_are_refused() {
        let mut s = Server::new();
        let (mut r, _) = s.start(Command::query("LOAD DATA LOCAL INFILE 'x' INTO TABLE t"));
        let p = s.answer(&mut r, &[b"\xfbx".to_vec()]).unwrap();
        assert!(matches!(p, Progress::Wait));
        assert_eq!(s.sent.last(), Some(&(2, Vec::new())), "an empty file");
        let h = Header { len: 7, seq: 3 };
        let p = r.on_packet(&mut s.conn(), h, &ok()).unwrap();
        assert!(matches!(p, Progress::Done(Ok(_))));
        // Nothing is expected any more.
        assert!(matches!(
            r.on_packet(&mut s.conn(), h, &ok()),
            Err(ScriptError::Unasked)
        ));
    }

    #[test]
    fn a_release_reads_the_warnings_then_clears_the_one_shots() {
        let mut s = Server::new();
        let steps = crate::session::Release {
            capture_warnings: true,
            statements: vec!["SET insert_id = 0".into()],
        };
        let (mut r, _) = s.start(Release::new(steps.clone()));
        s.answer(&mut r, &two_columns(&[("Note", "1003")])).unwrap();
        let p = s.answer(&mut r, &[ok()]).unwrap();
        let Progress::Done(Some(w)) = p else {
            panic!("{p:?}")
        };
        assert_eq!(w.rows.len(), 1);
        assert_eq!(s.queries(), ["SHOW WARNINGS", "SET insert_id = 0"]);
        // A refused SHOW WARNINGS loses only the list; a refused statement fails.
        let mut s = Server::new();
        let (mut r, _) = s.start(Release::new(steps));
        s.answer(&mut r, &[err(1146, "no")]).unwrap();
        let e = s.answer(&mut r, &[err(1064, "syntax")]);
        assert!(matches!(e, Err(ScriptError::Server(_))), "{e:?}");
    }
}
