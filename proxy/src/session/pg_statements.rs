//! Named prepared statements of the extended protocol without pinning (transaction
//! pooling). Sans-IO: the client's bytes in, the bytes for the server out; the server's
//! bytes in, what to drop out.
//!
//! A client's statement is `__dbp<pid>_<n>` on the servers, `n` new for each of the
//! client's definitions (the client's own namespace: no two clients ever share or collide
//! on a name, so a statement always means what its client prepared, whatever
//! `search_path` says, and a name the client closes and prepares again with another text
//! never meets a copy of the old one left on another connection). A client keeps the
//! definition of each statement it prepared; when it binds or describes one on a server
//! connection that lacks it, a Parse goes first, and that Parse's ParseComplete is
//! dropped from the answer. A Close closes the server's copy on the connection at hand;
//! copies left on others are bounded: a connection that holds more than
//! [`MAX_SERVER_STATEMENTS`] closes its least recently used ones as it goes back to the pool.
//!
//! Replies are matched to requests in order, with PostgreSQL's rule that an error skips
//! everything up to the next Sync: a Parse that was skipped (or failed) never existed.

use super::pg_sql_statements::{ClientSql, Fix, ServerSql};
use super::postgres::{may_name_sql_statements, seen, sql_names, Seen};
use crate::postgres::frame::{body_len, FrameError, HEADER_LEN};
use crate::postgres::messages::error_field;
use std::collections::{HashMap, VecDeque};

/// A server connection with more prepared statements than this (dbproxy's names and the
/// clients' SQL-level ones) closes the least recently used when it goes back to the pool.
pub const MAX_SERVER_STATEMENTS: usize = 1000;

/// A simple Query up to this long is taken whole, to read the SQL-level prepared
/// statements it names before it goes ([`crate::session::pg_sql_statements`]); a longer
/// one passes as it arrives.
pub const WHOLE_QUERY_LIMIT: usize = 64 * 1024;

/// One of a client's statements: the Parse body after the name (query text, parameter
/// types), and what its text does to the session.
#[derive(Debug)]
struct Def {
    rest: Vec<u8>,
    seen: Seen,
    /// Its text may name SQL-level prepared statements (`EXECUTE q1`): they are made to
    /// agree wherever it is bound or described.
    names_sql: bool,
    /// Its name on the servers (made once: a Bind allocates nothing).
    server_name: Vec<u8>,
    /// When it was defined ([`ClientStatements::generation`]).
    made: u64,
}

/// The statements a client prepared, by name.
#[derive(Debug, Default)]
pub struct ClientStatements {
    defs: HashMap<Vec<u8>, Def>,
    /// `__dbp<pid>_`.
    prefix: Vec<u8>,
    /// Counts the statements defined and prepared on servers: what a `DEALLOCATE ALL`
    /// removes is what came before it.
    generation: u64,
    /// Its SQL-level statements (`PREPARE`).
    pub sql: ClientSql,
}

/// The statements of dbproxy's naming a server connection holds, each with the
/// connection's generation when it was prepared there and when it was last used there
/// (the least used go first when the connection holds too many).
#[derive(Debug, Default, Clone)]
pub struct ServerStatements {
    known: HashMap<Vec<u8>, Held>,
    generation: u64,
    /// Counts binds and describes: a statement's `used` is the count at its last one.
    uses: u64,
    /// The clients' SQL-level statements it holds (under their own names).
    pub sql: ServerSql,
}

/// One statement on a server connection: when it was prepared and last used there.
#[derive(Debug, Clone, Copy)]
struct Held {
    made: u64,
    used: u64,
}

impl ServerStatements {
    /// The statements of dbproxy's naming.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Every prepared statement it holds: dbproxy's names and the SQL-level ones.
    pub fn total(&self) -> usize {
        self.known.len() + self.sql.len()
    }

    /// The server's statements are gone (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub fn clear(&mut self) {
        self.known.clear();
        self.sql.clear();
    }

    /// The generation now: statements prepared from here on are younger.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn insert(&mut self, server_name: Vec<u8>) {
        self.generation += 1;
        self.uses += 1;
        let held = Held {
            made: self.generation,
            used: self.uses,
        };
        self.known.insert(server_name, held);
    }

    /// Whether the server holds a statement of this name, which is being used now.
    fn touch(&mut self, server_name: &[u8]) -> bool {
        match self.known.get_mut(server_name) {
            Some(h) => {
                self.uses += 1;
                h.used = self.uses;
                true
            }
            None => false,
        }
    }

    /// The statements of dbproxy's naming beyond the `keep` most recently used, least
    /// recently used first.
    pub fn least_used(&self, keep: usize) -> Vec<Vec<u8>> {
        let mut all: Vec<(u64, &Vec<u8>)> = self.known.iter().map(|(n, h)| (h.used, n)).collect();
        all.sort_unstable();
        let evict = all.len().saturating_sub(keep);
        all.into_iter()
            .take(evict)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// The server closed these.
    pub fn forget(&mut self, names: &[Vec<u8>]) {
        for n in names {
            self.known.remove(n);
        }
    }

    /// Forgets the statements prepared up to generation `upto` (a `DEALLOCATE ALL` sent
    /// after them).
    pub fn clear_upto(&mut self, upto: u64) {
        self.known.retain(|_, h| h.made > upto);
    }

    /// Whether the server holds a statement of this name (dbproxy's naming).
    pub fn contains(&self, server_name: &[u8]) -> bool {
        self.known.contains_key(server_name)
    }
}

/// A request whose answer is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A Parse: its ParseComplete is dropped when dbproxy sent it (`injected`).
    Parse {
        server_name: Vec<u8>,
        client_name: Vec<u8>,
        injected: bool,
    },
    /// A Close: its CloseComplete is dropped when dbproxy sent it (`injected`).
    Close { injected: bool },
    /// A Sync: its ReadyForQuery ends the skipping after an error.
    Sync,
    /// A simple Query: an error in it skips nothing.
    Query,
    /// A FunctionCall (answered up to ReadyForQuery, like a Query).
    Function,
    /// A message dbproxy sent to make the SQL-level statement `name` agree with the
    /// client's (a Close, or the Parse, Bind and Execute of its `PREPARE`): its answer
    /// (`answer`, the tag) is dropped, and so is an error when `quiet`.
    Fixup {
        name: Vec<u8>,
        answer: u8,
        quiet: bool,
    },
    /// A Sync dbproxy sent behind quiet fixups: its ReadyForQuery is dropped.
    QuietSync,
}

/// What to send the server for the client's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Forward {
    /// The first `n` bytes, as they are.
    AsIs(usize),
    /// What `out` holds, instead of the first `n` bytes.
    Rewritten(usize),
}

/// One link's matching of requests and answers, and where the walks stand.
#[derive(Debug, Default)]
pub struct Exchange {
    queue: VecDeque<Entry>,
    /// Bytes of a client message being passed through (its start was forwarded).
    client_left: usize,
    /// The server message being walked: its header so far, and its bytes still to come.
    head: [u8; HEADER_LEN],
    have: usize,
    server_left: usize,
    dropping: bool,
    /// An ErrorResponse being held until its severity is known.
    holding: bool,
    held: Vec<u8>,
    /// The server sent a FATAL (or PANIC) error, held back from the client: its message.
    fatal: Option<String>,
    /// The server is in copy-in mode (CopyInResponse, until the client's CopyDone or
    /// CopyFail, or an error): it ignores Syncs.
    copy_in: bool,
    /// Requests answered up to ReadyForQuery (Sync, Query, FunctionCall): queued and done.
    queued: u64,
    done: u64,
    /// A `DEALLOCATE ALL` (or `DISCARD ALL`) in the request numbered `.0`: when it is
    /// answered without an error, the statements up to generation `.1` are gone (the
    /// client's and the server connection's generations; `.2`: an error came).
    deallocating: Option<(u64, (u64, u64), bool)>,
    /// The client sent extended-protocol messages since its last Sync.
    extended: bool,
}

/// A change to the server's bytes on their way to the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Edit<'a> {
    /// These bytes of the input do not go.
    Drop(usize, usize),
    /// These bytes go at this place of the input.
    Insert(usize, &'a [u8]),
}

impl ClientStatements {
    pub fn new(pid: i32) -> ClientStatements {
        ClientStatements {
            defs: HashMap::new(),
            prefix: format!("__dbp{pid}_").into_bytes(),
            generation: 0,
            sql: ClientSql::default(),
        }
    }

    /// The generation now: statements defined or prepared from here on are younger.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Forgets the statements defined up to generation `upto`.
    pub fn clear_upto(&mut self, upto: u64) {
        self.defs.retain(|_, d| d.made > upto);
    }

    pub fn len(&self) -> usize {
        self.defs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.defs.is_empty()
    }

    /// The client's statements are gone (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub fn clear(&mut self) {
        self.defs.clear();
    }

    /// The text of the client's statement `name`.
    pub fn text_of(&self, name: &[u8]) -> Option<&[u8]> {
        let rest = &self.defs.get(name)?.rest;
        cstr(rest).map(|(text, _)| text)
    }

    /// The client closed its statement `name` (on no server: a server connection that
    /// holds it closes it when the client's next Close or `DEALLOCATE` reaches it, or it
    /// is cleared as the connection's statements grow).
    pub fn forget(&mut self, name: &[u8]) {
        self.defs.remove(name);
    }

    /// The client's Parse of `name` (after `name`: the text, its parameter types): its
    /// name on the servers, new for each definition (a name closed and prepared again
    /// with another text never meets the old text's copy left on another connection).
    pub(crate) fn define(&mut self, name: &[u8], rest: &[u8]) -> Vec<u8> {
        let mut parse = Vec::with_capacity(rest.len() + 1);
        parse.push(0);
        parse.extend_from_slice(rest);
        let seen = seen(b'P', &parse);
        let names_sql = may_name_sql_statements(cstr(rest).map_or(rest, |(t, _)| t));
        let made = self.next_generation();
        let mut server_name = self.prefix.clone();
        server_name.extend_from_slice(made.to_string().as_bytes());
        self.defs.insert(
            name.to_vec(),
            Def {
                rest: rest.to_vec(),
                seen,
                names_sql,
                server_name: server_name.clone(),
                made,
            },
        );
        server_name
    }
}

/// Splits a C string off the front of `b`.
fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((b.get(..end)?, b.get(end + 1..)?))
}

fn message(out: &mut Vec<u8>, tag: u8, parts: &[&[u8]]) {
    let len: usize = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
    out.push(tag);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

impl Exchange {
    /// Starts over for a new exchange, keeping its queue's room.
    pub fn reset(&mut self) {
        self.queue.clear();
        self.client_left = 0;
        self.have = 0;
        self.server_left = 0;
        self.dropping = false;
        self.holding = false;
        self.held.clear();
        self.fatal = None;
        self.copy_in = false;
        self.queued = 0;
        self.done = 0;
        self.deallocating = None;
        self.extended = false;
    }

    /// The last request sent deallocates every statement prepared up to `upto` (the
    /// client's and the server connection's generations), if it succeeds.
    pub fn deallocates(&mut self, upto: (u64, u64)) {
        self.deallocating = Some((self.queued, upto, false));
    }

    /// The message of a FATAL error the server sent (held back from the client: the
    /// server closes the connection after it, and the client need not lose its session).
    pub fn take_fatal(&mut self) -> Option<String> {
        self.fatal.take()
    }

    /// Whether a request is still waiting for its answer.
    pub fn outstanding(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Reads the client's bytes on their way to `server`: statements renamed, missing
    /// ones prepared first. A P, B, D or C message is taken whole (bytes of one that has
    /// not fully arrived are left for the next call); others pass as they arrive.
    /// `bound` hears what the text of each named statement bound or described does.
    pub fn from_client(
        &mut self,
        stmts: &mut ClientStatements,
        server: &mut ServerStatements,
        input: &[u8],
        out: &mut Vec<u8>,
        mut bound: impl FnMut(&Seen),
    ) -> Result<Forward, FrameError> {
        out.clear();
        let mut i = self.client_left.min(input.len());
        self.client_left -= i;
        let mut changed = false;
        while self.client_left == 0 {
            let Some(head) = input.get(i..i + HEADER_LEN) else {
                break;
            };
            let tag = head[0];
            let body_len = body_len([head[1], head[2], head[3], head[4]])?;
            let total = HEADER_LEN + body_len;
            if tag == b'Q' && total <= WHOLE_QUERY_LIMIT {
                let Some(body) = input.get(i + HEADER_LEN..i + total) else {
                    break;
                };
                let start = out.len();
                // Fixups go ahead of the query, behind a Sync of their own (an error
                // in them skips nothing of the client's). Not inside an unsynced batch.
                if self.extended && may_name_sql_statements(body) {
                    // No fixups inside an unsynced batch (an earlier error would skip them
                    // with the query); what it changes is still read back.
                    stmts.sql.changing(&sql_names(body));
                } else if !self.extended && self.sql_fixups(stmts, server, body, true, out) {
                    if !changed {
                        let fixups = out.split_off(start);
                        out.clear();
                        out.extend_from_slice(input.get(..i).unwrap_or_default());
                        out.extend_from_slice(&fixups);
                        changed = true;
                    }
                    out.extend_from_slice(input.get(i..i + total).unwrap_or_default());
                    self.queue.push_back(Entry::Query);
                    self.queued += 1;
                    i += total;
                    continue;
                }
                out.truncate(start);
            }
            if matches!(tag, b'P' | b'B' | b'D' | b'C') {
                self.extended = true;
                let Some(body) = input.get(i + HEADER_LEN..i + total) else {
                    break;
                };
                let start = out.len();
                if self.rewrite(stmts, server, tag, body, out, &mut bound) {
                    if !changed {
                        // What came before passes unchanged, ahead of the rewrite.
                        let rewritten = out.split_off(start);
                        out.clear();
                        out.extend_from_slice(input.get(..i).unwrap_or_default());
                        out.extend_from_slice(&rewritten);
                        changed = true;
                    }
                } else {
                    out.truncate(start);
                    if changed {
                        out.extend_from_slice(input.get(i..i + total).unwrap_or_default());
                    }
                }
                i += total;
                continue;
            }
            match tag {
                // The server ignores a Sync in copy-in mode.
                b'S' if self.copy_in => {}
                b'S' => {
                    self.queue.push_back(Entry::Sync);
                    self.queued += 1;
                    self.extended = false;
                }
                b'E' | b'H' => self.extended = true,
                b'c' | b'f' => self.copy_in = false,
                b'Q' => {
                    self.queue.push_back(Entry::Query);
                    self.queued += 1;
                }
                b'F' => {
                    self.queue.push_back(Entry::Function);
                    self.queued += 1;
                }
                _ => {}
            }
            let have = total.min(input.len() - i);
            if changed {
                out.extend_from_slice(input.get(i..i + have).unwrap_or_default());
            }
            i += have;
            self.client_left = total - have;
        }
        Ok(if changed {
            Forward::Rewritten(i)
        } else {
            Forward::AsIs(i)
        })
    }

    /// A P, B, D or C message: true when its rewrite (and a Parse ahead of it) went to
    /// `out`; false when it goes unchanged.
    fn rewrite(
        &mut self,
        stmts: &mut ClientStatements,
        server: &mut ServerStatements,
        tag: u8,
        body: &[u8],
        out: &mut Vec<u8>,
        bound: &mut impl FnMut(&Seen),
    ) -> bool {
        match tag {
            b'P' => {
                let Some((name, rest)) = cstr(body) else {
                    return false;
                };
                // SQL-level statements its text names are made to agree first; an error
                // there is the Parse's, as the server then skips to the Sync.
                let text = cstr(rest).map_or(rest, |(t, _)| t);
                if self.sql_fixups(stmts, server, text, false, out) && name.is_empty() {
                    message(out, b'P', &[body]);
                    self.queue.push_back(Entry::Parse {
                        server_name: Vec::new(),
                        client_name: Vec::new(),
                        injected: false,
                    });
                    return true;
                }
                if name.is_empty() {
                    self.queue.push_back(Entry::Parse {
                        server_name: Vec::new(),
                        client_name: Vec::new(),
                        injected: false,
                    });
                    return false;
                }
                if stmts.defs.contains_key(name) {
                    // PostgreSQL refuses a Parse of a name in use (42P05): the server
                    // answers it so, with the first definition in place there.
                    let Some(server_name) = self.ensure(stmts, server, name, out, bound) else {
                        return false;
                    };
                    message(out, b'P', &[server_name, &[0], rest]);
                    self.queue.push_back(Entry::Parse {
                        server_name: Vec::new(),
                        client_name: Vec::new(),
                        injected: false,
                    });
                    return true;
                }
                let server_name = stmts.define(name, rest);
                message(out, b'P', &[&server_name, &[0], rest]);
                server.insert(server_name.clone());
                self.queue.push_back(Entry::Parse {
                    server_name,
                    client_name: name.to_vec(),
                    injected: false,
                });
                true
            }
            b'B' => {
                let Some((portal, rest)) = cstr(body) else {
                    return false;
                };
                let Some((name, rest)) = cstr(rest) else {
                    return false;
                };
                let Some(server_name) = self.ensure(stmts, server, name, out, bound) else {
                    return false;
                };
                message(out, b'B', &[portal, &[0], server_name, &[0], rest]);
                true
            }
            b'D' | b'C' => {
                if tag == b'C' {
                    self.queue.push_back(Entry::Close { injected: false });
                }
                let (Some(&b'S'), Some((name, _))) = (body.first(), body.get(1..).and_then(cstr))
                else {
                    return false;
                };
                if tag == b'C' {
                    let Some(def) = stmts.defs.remove(name).filter(|_| !name.is_empty()) else {
                        return false;
                    };
                    let server_name = def.server_name;
                    server.known.remove(&server_name);
                    message(out, b'C', &[b"S", &server_name, &[0]]);
                    return true;
                }
                let Some(server_name) = self.ensure(stmts, server, name, out, bound) else {
                    return false;
                };
                message(out, b'D', &[b"S", server_name, &[0]]);
                true
            }
            _ => false,
        }
    }

    /// Makes `server` agree with the client on the SQL-level statements `text` names,
    /// into `out` (true when anything went there): another client's statement of a name
    /// is closed, the client's own prepared again from its `PREPARE`, by an unnamed Parse,
    /// Bind and Execute whose answers are dropped. `quiet`: a Sync of dbproxy's follows,
    /// and an error in them is dropped too (ahead of a simple Query, which then answers
    /// for itself); otherwise an error is the client's next message's, as the server
    /// skips to the client's Sync.
    fn sql_fixups(
        &mut self,
        stmts: &mut ClientStatements,
        server: &mut ServerStatements,
        text: &[u8],
        quiet: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        if !may_name_sql_statements(text) {
            return false;
        }
        let mut names = sql_names(text);
        if names.lists || names.all {
            // It reads `pg_prepared_statements`, or removes every statement: the
            // connection is to hold the client's own statements and no other client's
            // (then what the server reads back afterwards is the client's).
            let every: Vec<Vec<u8>> = stmts
                .sql
                .names()
                .chain(server.sql.names())
                .map(<[u8]>::to_vec)
                .collect();
            for n in every {
                if !names.used.contains(&n) {
                    names.used.push(n);
                }
            }
        }
        let mut any = false;
        for name in &names.used {
            let unsure = self
                .queue
                .iter()
                .any(|e| matches!(e, Entry::Fixup { name: n, .. } if n == name));
            let fix = stmts.sql.fix(&server.sql, name, unsure);
            let close = match &fix {
                Fix::Nothing => continue,
                Fix::Close => true,
                Fix::Prepare { close, .. } => *close,
            };
            any = true;
            let mut fixup = |answer| {
                self.queue.push_back(Entry::Fixup {
                    name: name.clone(),
                    answer,
                    quiet,
                })
            };
            if close {
                message(out, b'C', &[b"S", name, &[0]]);
                fixup(b'3');
                server.sql.lacks(name);
            }
            if let Fix::Prepare { text, .. } = fix {
                message(out, b'P', &[&[0], &text, &[0], &[0, 0]]);
                message(out, b'B', &[&[0, 0], &[0, 0], &[0, 0], &[0, 0]]);
                message(out, b'E', &[&[0], &[0, 0, 0, 0]]);
                fixup(b'1');
                fixup(b'2');
                fixup(b'C');
                server.sql.holds(name, Some(text));
            }
        }
        if any && quiet {
            message(out, b'S', &[]);
            self.queue.push_back(Entry::QuietSync);
            self.queued += 1;
        }
        stmts.sql.changing(&names);
        any
    }

    /// The server's name of the client's statement `name`, prepared on `server` first
    /// (into `out`) when it lacks it; `None` for the unnamed statement or one the client
    /// never prepared (the message goes unchanged, and the server answers for it).
    fn ensure<'s>(
        &mut self,
        stmts: &'s mut ClientStatements,
        server: &mut ServerStatements,
        name: &[u8],
        out: &mut Vec<u8>,
        bound: &mut impl FnMut(&Seen),
    ) -> Option<&'s [u8]> {
        if name.is_empty() {
            return None;
        }
        // The SQL-level statements its text names, wherever it runs.
        let text = stmts
            .defs
            .get(name)
            .filter(|d| d.names_sql)
            .map(|d| cstr(&d.rest).map_or(&d.rest[..], |(t, _)| t).to_vec());
        if let Some(text) = text {
            self.sql_fixups(stmts, server, &text, false, out);
        }
        let (inject, unsure) = {
            let def = stmts.defs.get(name)?;
            bound(&def.seen);
            // A Parse dbproxy sent ahead of an earlier Sync still unanswered may yet fail
            // (in a failed transaction, every Parse does): prepared again, behind a Close
            // that makes the Parse valid either way.
            let unsure = self.queue.iter().any(|e| {
                matches!(e, Entry::Parse { server_name, injected: true, .. } if *server_name == def.server_name)
            });
            (unsure || !server.touch(&def.server_name), unsure)
        };
        if inject {
            let def = stmts.defs.get(name)?;
            if unsure {
                message(out, b'C', &[b"S", &def.server_name, &[0]]);
                self.queue.push_back(Entry::Close { injected: true });
            }
            message(out, b'P', &[&def.server_name, &[0], &def.rest]);
            server.insert(def.server_name.clone());
            self.queue.push_back(Entry::Parse {
                server_name: def.server_name.clone(),
                client_name: name.to_vec(),
                injected: true,
            });
        }
        stmts.defs.get(name).map(|d| d.server_name.as_slice())
    }

    /// Reads the server's bytes on their way to the client; `edit` hears what changes
    /// on the way: the ParseComplete of a Parse dbproxy sent is dropped, and each
    /// ErrorResponse is held until it is whole, then passed on, unless it is FATAL (see
    /// [`Exchange::take_fatal`]).
    pub fn from_server(
        &mut self,
        stmts: &mut ClientStatements,
        server: &mut ServerStatements,
        input: &[u8],
        mut edit: impl FnMut(Edit<'_>),
    ) -> Result<(), FrameError> {
        let mut i = 0;
        while i < input.len() {
            if self.server_left > 0 {
                let k = self.server_left.min(input.len() - i);
                self.pass(input, i, k, &mut edit);
                i += k;
                self.server_left -= k;
                if self.server_left == 0 {
                    self.ended(stmts, server, i, &mut edit);
                }
                continue;
            }
            // A header, byte by byte into `head` (it may be split across reads).
            let want = HEADER_LEN - self.have;
            let k = want.min(input.len() - i);
            if self.have == 0 {
                let tag = input[i];
                self.dropping = match (tag, self.queue.front()) {
                    (b'1', Some(Entry::Parse { injected, .. })) => *injected,
                    (b'3', Some(Entry::Close { injected })) => *injected,
                    (b'E', Some(Entry::Fixup { quiet, .. })) => *quiet,
                    (t, Some(Entry::Fixup { answer, .. })) => t == *answer,
                    (b'Z', Some(Entry::QuietSync)) => true,
                    _ => false,
                };
                self.holding = tag == b'E' && !self.dropping;
                self.held.clear();
            }
            self.head[self.have..self.have + k].copy_from_slice(&input[i..i + k]);
            self.pass(input, i, k, &mut edit);
            self.have += k;
            i += k;
            if self.have == HEADER_LEN {
                let [_, a, b, c, d] = self.head;
                self.server_left = body_len([a, b, c, d])?;
                self.have = 0;
                if self.server_left == 0 {
                    self.ended(stmts, server, i, &mut edit);
                }
            }
        }
        Ok(())
    }

    /// `k` bytes of the current message at `i`: dropped or held, or left to pass.
    fn pass(&mut self, input: &[u8], i: usize, k: usize, edit: &mut impl FnMut(Edit<'_>)) {
        if self.dropping || self.holding {
            edit(Edit::Drop(i, i + k));
        }
        if self.holding {
            self.held
                .extend_from_slice(input.get(i..i + k).unwrap_or_default());
        }
    }

    /// The current message ended at `at` in the input.
    fn ended(
        &mut self,
        stmts: &mut ClientStatements,
        server: &mut ServerStatements,
        at: usize,
        edit: &mut impl FnMut(Edit<'_>),
    ) {
        if self.holding {
            self.holding = false;
            let body = self.held.get(HEADER_LEN..).unwrap_or_default();
            let severity = error_field(body, b'V').or_else(|| error_field(body, b'S'));
            if matches!(severity, Some(b"FATAL" | b"PANIC")) {
                let message = error_field(body, b'M').unwrap_or_default();
                self.fatal = Some(String::from_utf8_lossy(message).into_owned());
            } else {
                edit(Edit::Insert(at, &self.held));
            }
        }
        self.answered(stmts, server, self.head[0]);
    }

    /// A whole server message with this tag arrived.
    fn answered(&mut self, stmts: &mut ClientStatements, server: &mut ServerStatements, tag: u8) {
        if let Some(Entry::Fixup { answer, .. }) = self.queue.front() {
            if tag == *answer {
                self.queue.pop_front();
                return;
            }
        }
        match tag {
            b'1' => {
                if let Some(Entry::Parse { server_name, .. }) = self.queue.front() {
                    // Known for sure now (an earlier Parse of it may have failed since).
                    if !server_name.is_empty() && !server.contains(server_name) {
                        server.insert(server_name.clone());
                    }
                    self.queue.pop_front();
                }
            }
            b'3' => {
                if matches!(self.queue.front(), Some(Entry::Close { .. })) {
                    self.queue.pop_front();
                }
            }
            b'E' => {
                // An error ends a copy-in: the server then skips to the next Sync.
                self.copy_in = false;
                if let Some((at, _, failed)) = &mut self.deallocating {
                    if *at == self.done + 1 {
                        *failed = true;
                    }
                }
                if matches!(self.queue.front(), Some(Entry::Query | Entry::Function)) {
                    return;
                }
                // Everything up to the Sync is skipped: those Parses never happened.
                while let Some(e) = self.queue.front() {
                    if matches!(e, Entry::Sync | Entry::QuietSync) {
                        break;
                    }
                    let e = self.queue.pop_front();
                    if let Some(Entry::Fixup { name, .. }) = &e {
                        // What the connection holds of the name is unknown now, and a
                        // read-back cannot tell the client's.
                        server.sql.holds(name, None);
                        stmts.sql.fixup_failed(name);
                    }
                    if let Some(Entry::Parse {
                        server_name,
                        client_name,
                        injected,
                    }) = e
                    {
                        if !server_name.is_empty() {
                            server.known.remove(&server_name);
                            // The client's Parse failed: it never defined the name
                            // (unless it defined it again since).
                            let same = stmts
                                .defs
                                .get(&client_name)
                                .is_some_and(|d| d.server_name == server_name);
                            if !injected && same {
                                stmts.defs.remove(&client_name);
                            }
                        }
                    }
                }
            }
            b'Z' => {
                self.copy_in = false;
                if matches!(
                    self.queue.front(),
                    Some(Entry::Sync | Entry::QuietSync | Entry::Query | Entry::Function)
                ) {
                    self.queue.pop_front();
                    self.done += 1;
                }
                if let Some((at, upto, failed)) = self.deallocating {
                    if at <= self.done {
                        self.deallocating = None;
                        if !failed {
                            stmts.clear_upto(upto.0);
                            server.clear_upto(upto.1);
                        }
                    }
                }
            }
            b'G' => {
                // A COPY FROM STDIN started by an Execute: the Syncs the client sent
                // behind it (tokio-postgres sends one) are ignored, and answered by nothing.
                self.copy_in = true;
                while self.queue.front() == Some(&Entry::Sync) {
                    self.queue.pop_front();
                    self.done += 1;
                }
            }
            _ => {}
        }
    }
}

/// Named Parses a client sends between transactions, up to their Sync, answered without
/// a server connection (ParseComplete each, ReadyForQuery `I`): the statements are
/// prepared on a server when first bound there. A client that prepares synchronously
/// (pgbench -M prepared, PQprepare) thus never waits for a connection that another of
/// its own sessions holds. Returns the bytes answered (`None`: the input is not such a
/// sequence, or not whole yet, and goes to a server).
pub fn answer_parses(
    stmts: &mut ClientStatements,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Option<usize> {
    let mut i = 0;
    let mut names: Vec<(&[u8], &[u8])> = Vec::new();
    loop {
        let head = input.get(i..i + HEADER_LEN)?;
        let len = body_len([head[1], head[2], head[3], head[4]]).ok()?;
        let body = input.get(i + HEADER_LEN..i + HEADER_LEN + len)?;
        i += HEADER_LEN + len;
        match head[0] {
            b'P' => {
                let (name, rest) = cstr(body)?;
                let taken = stmts.defs.contains_key(name) || names.iter().any(|(n, _)| *n == name);
                if name.is_empty() || taken {
                    return None;
                }
                names.push((name, rest));
            }
            b'S' if !names.is_empty() => break,
            _ => return None,
        }
    }
    for (name, rest) in names {
        stmts.define(name, rest);
        message(out, b'1', &[]);
    }
    message(out, b'Z', &[b"I"]);
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::frame::msg;

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
    }

    fn bind(name: &str) -> Vec<u8> {
        msg(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes())
    }

    /// The messages in `b`, as (tag, body).
    fn split(mut b: &[u8]) -> Vec<(char, Vec<u8>)> {
        let mut v = Vec::new();
        while b.len() >= 5 {
            let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
            v.push((b[0] as char, b[5..1 + len].to_vec()));
            b = &b[1 + len..];
        }
        v
    }

    fn send(
        x: &mut Exchange,
        c: &mut ClientStatements,
        s: &mut ServerStatements,
        input: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        match x.from_client(c, s, input, &mut out, |_| {}).unwrap() {
            Forward::AsIs(n) => input[..n].to_vec(),
            Forward::Rewritten(n) => {
                assert_eq!(n, input.len());
                out
            }
        }
    }

    /// The client prepares `name` with `sql` on `s`, and the server says yes.
    fn prepare(
        x: &mut Exchange,
        c: &mut ClientStatements,
        s: &mut ServerStatements,
        name: &str,
        sql: &str,
    ) {
        send(x, c, s, &[parse(name, sql), msg(b'S', b"")].concat());
        answer(x, c, s, &[msg(b'1', b""), msg(b'Z', b"I")].concat());
    }

    fn answer(
        x: &mut Exchange,
        c: &mut ClientStatements,
        s: &mut ServerStatements,
        input: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut from = 0;
        x.from_server(c, s, input, |e| match e {
            Edit::Drop(a, b) => {
                out.extend_from_slice(&input[from..a]);
                from = b;
            }
            Edit::Insert(at, bytes) => {
                out.extend_from_slice(&input[from..at]);
                from = at;
                out.extend_from_slice(bytes);
            }
        })
        .unwrap();
        out.extend_from_slice(&input[from..]);
        out
    }

    #[test]
    fn unnamed_statements_and_other_messages_pass_as_they_are() {
        let (mut x, mut c, mut s) = (
            Exchange::default(),
            ClientStatements::new(7),
            ServerStatements::default(),
        );
        let mut input = parse("", "SELECT 1");
        input.extend(bind(""));
        input.extend(msg(b'E', b"\0\0\0\0\0"));
        input.extend(msg(b'S', b""));
        let mut out = Vec::new();
        assert_eq!(
            x.from_client(&mut c, &mut s, &input, &mut out, |_| {})
                .unwrap(),
            Forward::AsIs(input.len())
        );
        assert!(x.outstanding());
        let reply = [
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
        ]
        .concat();
        assert_eq!(answer(&mut x, &mut c, &mut s, &reply), reply);
        assert!(!x.outstanding());
    }

    #[test]
    fn a_statement_is_renamed_and_prepared_again_on_a_connection_that_lacks_it() {
        let mut c = ClientStatements::new(7);
        let (mut x, mut s1) = (Exchange::default(), ServerStatements::default());
        let input = [parse("s1", "SELECT $1"), msg(b'S', b"")].concat();
        let sent = split(&send(&mut x, &mut c, &mut s1, &input));
        assert_eq!(sent[0], ('P', b"__dbp7_1\0SELECT $1\0\0\0".to_vec()));
        let reply = [msg(b'1', b""), msg(b'Z', b"I")].concat();
        assert_eq!(
            answer(&mut x, &mut c, &mut s1, &reply),
            reply,
            "the client's own Parse is answered"
        );

        // Another server connection: a Parse goes first, its answer dropped.
        let (mut x, mut s2) = (Exchange::default(), ServerStatements::default());
        let input = [bind("s1"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
        let sent = split(&send(&mut x, &mut c, &mut s2, &input));
        let tags: String = sent.iter().map(|m| m.0).collect();
        assert_eq!(tags, "PBES");
        assert_eq!(sent[0].1, b"__dbp7_1\0SELECT $1\0\0\0");
        assert!(sent[1].1.starts_with(b"\0__dbp7_1\0"));
        let reply = [
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
        ]
        .concat();
        let to_client = answer(&mut x, &mut c, &mut s2, &reply);
        assert_eq!(
            split(&to_client).iter().map(|m| m.0).collect::<String>(),
            "2CZ"
        );
        // Prepared there now: no second Parse.
        let mut x = Exchange::default();
        let sent = split(&send(
            &mut x,
            &mut c,
            &mut s2,
            &[bind("s1"), msg(b'S', b"")].concat(),
        ));
        assert_eq!(sent.iter().map(|m| m.0).collect::<String>(), "BS");
    }

    /// tokio-postgres's COPY FROM STDIN: Bind, Execute, Sync (ignored by the server in
    /// copy-in mode), the data, CopyDone, Sync. On a link that goes on (a pinned client),
    /// the next injected Parse's answer is still the one dropped.
    #[test]
    fn syncs_a_copy_in_ignores_leave_no_answer_due() {
        let mut c = ClientStatements::new(3);
        let (mut x, mut s) = (Exchange::default(), ServerStatements::default());
        prepare(&mut x, &mut c, &mut s, "a", "SELECT 1");
        let mut s2 = ServerStatements::default();
        let copy = [bind(""), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
        send(&mut x, &mut c, &mut s2, &copy);
        answer(
            &mut x,
            &mut c,
            &mut s2,
            &[msg(b'2', b""), msg(b'G', b"\0\0\0")].concat(),
        );
        let data = [
            msg(b'd', b"1\n"),
            msg(b'S', b""),
            msg(b'c', b""),
            msg(b'S', b""),
        ]
        .concat();
        send(&mut x, &mut c, &mut s2, &data);
        answer(
            &mut x,
            &mut c,
            &mut s2,
            &[msg(b'C', b"COPY 1\0"), msg(b'Z', b"I")].concat(),
        );
        assert!(!x.outstanding(), "every answer due came");
        let sent = split(&send(
            &mut x,
            &mut c,
            &mut s2,
            &[bind("a"), msg(b'S', b"")].concat(),
        ));
        assert_eq!(sent.iter().map(|m| m.0).collect::<String>(), "PBS");
        let reply = [msg(b'1', b""), msg(b'2', b""), msg(b'Z', b"I")].concat();
        assert_eq!(
            answer(&mut x, &mut c, &mut s2, &reply),
            [msg(b'2', b""), msg(b'Z', b"I")].concat()
        );
    }

    /// Two Syncs' worth of Binds of a statement this connection lacks, pipelined: the
    /// second is prepared again behind a Close, so it works whether the first Parse did
    /// or not (in a failed transaction every Parse fails, as the client's Bind would).
    #[test]
    fn a_pipeline_prepares_again_what_an_unanswered_parse_may_not_have_made() {
        for parse_fails in [true, false] {
            let mut c = ClientStatements::new(5);
            let (mut x, mut s) = (Exchange::default(), ServerStatements::default());
            prepare(&mut x, &mut c, &mut s, "a", "SELECT 1");
            let mut s2 = ServerStatements::default();
            let batch = [bind("a"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
            let sent = split(&send(
                &mut x,
                &mut c,
                &mut s2,
                &[batch.clone(), batch].concat(),
            ));
            assert_eq!(sent.iter().map(|m| m.0).collect::<String>(), "PBESCPBES");
            assert_eq!(sent[4].1, b"S__dbp5_1\0");
            let err = msg(b'E', b"SERROR\0C25P02\0\0");
            let (reply, want) = if parse_fails {
                let r = [
                    err.clone(),
                    msg(b'Z', b"E"),
                    msg(b'3', b""),
                    err.clone(),
                    msg(b'Z', b"E"),
                ];
                let w = [err.clone(), msg(b'Z', b"E"), err, msg(b'Z', b"E")];
                (r.concat(), w.concat())
            } else {
                let ok = [
                    msg(b'1', b""),
                    msg(b'2', b""),
                    msg(b'C', b"SELECT 1\0"),
                    msg(b'Z', b"I"),
                ];
                let r = [ok.concat(), msg(b'3', b""), ok.concat()];
                let w = [msg(b'2', b""), msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat();
                (r.concat(), [w.clone(), w].concat())
            };
            assert_eq!(
                answer(&mut x, &mut c, &mut s2, &reply),
                want,
                "{parse_fails}"
            );
            assert!(!x.outstanding());
            assert_eq!(s2.contains(b"__dbp5_1"), !parse_fails, "{parse_fails}");
        }
    }

    /// `DEALLOCATE ALL` removes what was prepared before it, once answered without an
    /// error; a statement prepared behind it (same pipeline) stays.
    #[test]
    fn deallocate_all_removes_what_came_before_it_when_it_succeeds() {
        for fails in [false, true] {
            let mut c = ClientStatements::new(2);
            let (mut x, mut s) = (Exchange::default(), ServerStatements::default());
            prepare(&mut x, &mut c, &mut s, "old", "SELECT 1");
            let before = (c.generation(), s.generation());
            send(&mut x, &mut c, &mut s, &msg(b'Q', b"DEALLOCATE ALL\0"));
            x.deallocates(before);
            send(
                &mut x,
                &mut c,
                &mut s,
                &[parse("new", "SELECT 2"), msg(b'S', b"")].concat(),
            );
            let first = if fails {
                [msg(b'E', b"SERROR\0C25P02\0\0"), msg(b'Z', b"E")].concat()
            } else {
                [msg(b'C', b"DEALLOCATE ALL\0"), msg(b'Z', b"I")].concat()
            };
            answer(&mut x, &mut c, &mut s, &first);
            answer(
                &mut x,
                &mut c,
                &mut s,
                &[msg(b'1', b""), msg(b'Z', b"I")].concat(),
            );
            assert_eq!(c.defs.contains_key(&b"old"[..]), fails, "{fails}");
            assert_eq!(s.contains(b"__dbp2_1"), fails, "{fails}");
            assert!(c.defs.contains_key(&b"new"[..]) && s.contains(b"__dbp2_2"));
        }
    }

    /// A name closed and prepared again with another text gets a new server name: a copy
    /// of the old text left on another connection is never bound for it. A Parse of a
    /// name still in use is refused by the server (42P05), with the old definition kept.
    #[test]
    fn a_name_prepared_again_never_meets_its_old_text() {
        let mut c = ClientStatements::new(4);
        let (mut x, mut a) = (Exchange::default(), ServerStatements::default());
        prepare(&mut x, &mut c, &mut a, "s", "SELECT 1");
        // Another connection, b: s is closed there (its copy on a stays) and made anew.
        let mut b = ServerStatements::default();
        let close = msg(b'C', b"Ss\0");
        let input = [close, parse("s", "SELECT 2"), msg(b'S', b"")].concat();
        let sent = split(&send(&mut x, &mut c, &mut b, &input));
        assert_eq!(sent[0], ('C', b"S__dbp4_1\0".to_vec()));
        assert_eq!(sent[1].1, b"__dbp4_2\0SELECT 2\0\0\0");
        answer(
            &mut x,
            &mut c,
            &mut b,
            &[msg(b'3', b""), msg(b'1', b""), msg(b'Z', b"I")].concat(),
        );
        // Back on a: the new text is prepared there, under its own name.
        let sent = split(&send(
            &mut x,
            &mut c,
            &mut a,
            &[bind("s"), msg(b'S', b"")].concat(),
        ));
        assert_eq!(sent.iter().map(|m| m.0).collect::<String>(), "PBS");
        assert_eq!(sent[0].1, b"__dbp4_2\0SELECT 2\0\0\0");
        answer(
            &mut x,
            &mut c,
            &mut a,
            &[msg(b'1', b""), msg(b'2', b""), msg(b'Z', b"I")].concat(),
        );
        // A Parse of s while it is defined goes to the server under s's name (prepared
        // there first if missing), which refuses it; s keeps its text.
        let mut d = ServerStatements::default();
        let sent = split(&send(
            &mut x,
            &mut c,
            &mut d,
            &[parse("s", "SELECT 3"), msg(b'S', b"")].concat(),
        ));
        assert_eq!(sent.iter().map(|m| m.0).collect::<String>(), "PPS");
        assert_eq!(sent[0].1, b"__dbp4_2\0SELECT 2\0\0\0");
        assert_eq!(sent[1].1, b"__dbp4_2\0SELECT 3\0\0\0");
        let refused = msg(b'E', b"SERROR\0C42P05\0\0");
        let to_client = answer(
            &mut x,
            &mut c,
            &mut d,
            &[msg(b'1', b""), refused.clone(), msg(b'Z', b"I")].concat(),
        );
        assert_eq!(to_client, [refused, msg(b'Z', b"I")].concat());
        assert_eq!(c.text_of(b"s"), Some(&b"SELECT 2"[..]));
    }

    #[test]
    fn the_dropped_answer_may_arrive_byte_by_byte() {
        let mut c = ClientStatements::new(1);
        let (mut x, mut s) = (Exchange::default(), ServerStatements::default());
        prepare(&mut x, &mut c, &mut s, "a", "SELECT 1");
        let (mut x, mut s) = (Exchange::default(), ServerStatements::default());
        send(
            &mut x,
            &mut c,
            &mut s,
            &[bind("a"), msg(b'S', b"")].concat(),
        );
        let reply = [msg(b'1', b""), msg(b'2', b""), msg(b'Z', b"I")].concat();
        let mut got = Vec::new();
        for b in reply.chunks(1) {
            got.extend(answer(&mut x, &mut c, &mut s, b));
        }
        assert_eq!(got, [msg(b'2', b""), msg(b'Z', b"I")].concat());
        assert!(!x.outstanding());
    }

    #[test]
    fn an_error_skips_to_sync_and_a_failed_parse_never_existed() {
        let mut c = ClientStatements::new(1);
        let (mut x, mut s) = (Exchange::default(), ServerStatements::default());
        let input = [parse("bad", "SELEC"), bind("bad"), msg(b'S', b"")].concat();
        send(&mut x, &mut c, &mut s, &input);
        let reply = [msg(b'E', b"SERROR\0C42601\0\0"), msg(b'Z', b"I")].concat();
        assert_eq!(answer(&mut x, &mut c, &mut s, &reply), reply);
        assert!(c.is_empty() && s.is_empty() && !x.outstanding());
        // A Parse dbproxy sent that the error skipped is forgotten too.
        prepare(&mut x, &mut c, &mut s, "ok", "SELECT 1");
        let mut s2 = ServerStatements::default();
        let input = [bind("nope"), bind("ok"), msg(b'S', b"")].concat();
        send(&mut x, &mut c, &mut s2, &input);
        let reply = [msg(b'E', b"SERROR\0C26000\0\0"), msg(b'Z', b"I")].concat();
        assert_eq!(answer(&mut x, &mut c, &mut s2, &reply), reply);
        assert!(s2.is_empty(), "the skipped Parse is not on the server");
        assert_eq!(c.len(), 1, "the client's statement stays");
    }

    #[test]
    fn close_closes_the_servers_copy_and_forgets_the_statement() {
        let mut c = ClientStatements::new(3);
        let (mut x, mut s) = (Exchange::default(), ServerStatements::default());
        prepare(&mut x, &mut c, &mut s, "q", "SELECT 1");
        let sent = split(&send(
            &mut x,
            &mut c,
            &mut s,
            &[msg(b'C', b"Sq\0"), msg(b'S', b"")].concat(),
        ));
        assert_eq!(sent[0], ('C', b"S__dbp3_1\0".to_vec()));
        assert!(c.is_empty() && s.is_empty());
        // A portal's Close, and a statement's in a partial message, wait or pass.
        let mut out = Vec::new();
        let partial = &parse("z", "SELECT 2")[..7];
        assert_eq!(
            x.from_client(&mut c, &mut s, partial, &mut out, |_| {})
                .unwrap(),
            Forward::AsIs(0)
        );
        let portal = msg(b'C', b"Pq\0");
        assert_eq!(
            x.from_client(&mut c, &mut s, &portal, &mut out, |_| {})
                .unwrap(),
            Forward::AsIs(portal.len())
        );
    }

    #[test]
    fn a_long_message_passes_in_pieces() {
        let mut c = ClientStatements::new(3);
        let (mut x, mut s) = (Exchange::default(), ServerStatements::default());
        let data = msg(b'd', &[7u8; 100]);
        let mut out = Vec::new();
        assert_eq!(
            x.from_client(&mut c, &mut s, &data[..30], &mut out, |_| {})
                .unwrap(),
            Forward::AsIs(30)
        );
        let rest = [&data[30..], &parse("n", "SELECT 1")[..]].concat();
        match x
            .from_client(&mut c, &mut s, &rest, &mut out, |_| {})
            .unwrap()
        {
            Forward::Rewritten(n) => {
                assert_eq!(n, rest.len());
                assert_eq!(&out[..data.len() - 30], &data[30..]);
            }
            other => panic!("{other:?}"),
        }
    }

    fn query(sql: &str) -> Vec<u8> {
        msg(b'Q', format!("{sql}\0").as_bytes())
    }

    fn tags(b: &[u8]) -> String {
        split(b).iter().map(|m| m.0).collect()
    }

    /// The client `c` prepared `q1` with SQL on `s`, and it was read back.
    fn sql_prepared(c: &mut ClientStatements, s: &mut ServerStatements, text: &str) {
        let mut x = Exchange::default();
        send(&mut x, c, s, &query(text));
        c.sql
            .read_back(&mut s.sql, [(&b"q1"[..], text.as_bytes())])
            .unwrap();
    }

    #[test]
    fn a_query_naming_an_sql_statement_finds_it_on_any_connection() {
        let mut c = ClientStatements::new(5);
        let mut s1 = ServerStatements::default();
        sql_prepared(&mut c, &mut s1, "PREPARE q1 AS SELECT 1");
        // The connection it was prepared on needs nothing.
        let mut x = Exchange::default();
        let q = query("EXECUTE q1");
        assert_eq!(send(&mut x, &mut c, &mut s1, &q), q);

        // Another holds another client's q1: closed, then prepared from the client's text,
        // behind a Sync of dbproxy's; every answer to them is dropped.
        let mut s2 = ServerStatements::default();
        s2.sql.holds(
            b"q1",
            Some(std::sync::Arc::from(&b"PREPARE q1 AS SELECT 2"[..])),
        );
        let mut x = Exchange::default();
        let sent = send(&mut x, &mut c, &mut s2, &q);
        assert_eq!(tags(&sent), "CPBESQ");
        let m = split(&sent);
        assert_eq!(m[0].1, b"Sq1\0");
        assert_eq!(m[1].1, b"\0PREPARE q1 AS SELECT 1\0\0\0");
        let reply = [
            msg(b'3', b""),
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'C', b"PREPARE\0"),
            msg(b'Z', b"I"),
            msg(b'T', b"\0\0"),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
        ]
        .concat();
        assert_eq!(tags(&answer(&mut x, &mut c, &mut s2, &reply)), "TCZ");
        assert!(!x.outstanding());
        // Now it agrees.
        let mut x = Exchange::default();
        assert_eq!(send(&mut x, &mut c, &mut s2, &q), q);

        // A client without q1 gets another client's q1 closed first: its EXECUTE fails as
        // on a server of its own.
        let mut other = ClientStatements::new(6);
        let mut x = Exchange::default();
        assert_eq!(tags(&send(&mut x, &mut other, &mut s2, &q)), "CSQ");
        assert!(!s2.sql.may_hold(b"q1"));
    }

    #[test]
    fn a_failed_quiet_fixup_is_dropped_and_leaves_the_name_unknown() {
        let mut c = ClientStatements::new(5);
        let mut s1 = ServerStatements::default();
        sql_prepared(&mut c, &mut s1, "PREPARE q1 AS SELECT * FROM gone");
        let mut s2 = ServerStatements::default();
        let mut x = Exchange::default();
        assert_eq!(
            tags(&send(&mut x, &mut c, &mut s2, &query("EXECUTE q1"))),
            "PBESQ"
        );
        let error = msg(
            b'E',
            b"SERROR\0VERROR\0C42P01\0Mrelation \"gone\" does not exist\0\0",
        );
        let their_error = msg(
            b'E',
            b"SERROR\0VERROR\0C26000\0Mprepared statement \"q1\" does not exist\0\0",
        );
        let reply = [
            msg(b'1', b""),
            msg(b'2', b""),
            error.clone(),
            msg(b'Z', b"I"),
            their_error.clone(),
            msg(b'Z', b"I"),
        ]
        .concat();
        let to_client = answer(&mut x, &mut c, &mut s2, &reply);
        assert_eq!(to_client, [their_error, msg(b'Z', b"I")].concat());
        assert!(!x.outstanding());
        // Unknown: closed before it is prepared again.
        assert!(s2.sql.may_hold(b"q1"));
        let mut x = Exchange::default();
        assert_eq!(
            tags(&send(&mut x, &mut c, &mut s2, &query("EXECUTE q1"))),
            "CPBESQ"
        );
    }

    #[test]
    fn a_parse_naming_an_sql_statement_gets_loud_fixups_in_its_batch() {
        let mut c = ClientStatements::new(5);
        let mut s1 = ServerStatements::default();
        sql_prepared(&mut c, &mut s1, "PREPARE q1 AS SELECT 1");
        let mut s2 = ServerStatements::default();
        let mut x = Exchange::default();
        let input = [
            parse("", "EXECUTE q1"),
            bind(""),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'S', b""),
        ]
        .concat();
        assert_eq!(tags(&send(&mut x, &mut c, &mut s2, &input)), "PBEPBES");
        // The fixup's error is the client's Parse's: the server skips to the Sync.
        let error = msg(b'E', b"SERROR\0VERROR\0C25P02\0Maborted\0\0");
        let reply = [
            msg(b'1', b""),
            msg(b'2', b""),
            error.clone(),
            msg(b'Z', b"E"),
        ]
        .concat();
        assert_eq!(
            answer(&mut x, &mut c, &mut s2, &reply),
            [error, msg(b'Z', b"E")].concat()
        );
        assert!(!x.outstanding());
    }

    #[test]
    fn names_the_client_changes_are_left_alone_until_read_back() {
        let mut c = ClientStatements::new(5);
        let mut s = ServerStatements::default();
        s.sql.holds(
            b"q1",
            Some(std::sync::Arc::from(&b"PREPARE q1 AS SELECT 2"[..])),
        );
        let mut x = Exchange::default();
        // Another client's q1 is closed ahead of the client's PREPARE, and its EXECUTE
        // in the same exchange meets the client's own.
        let sent = send(&mut x, &mut c, &mut s, &query("PREPARE q1 AS SELECT 1"));
        assert_eq!(tags(&sent), "CSQ");
        let q = query("EXECUTE q1");
        assert_eq!(send(&mut x, &mut c, &mut s, &q), q);
        assert!(c.sql.needs_read_back());
    }

    #[test]
    fn the_least_recently_used_statements_of_a_connection_are_named_for_closing() {
        let mut c = ClientStatements::new(4);
        let mut s = ServerStatements::default();
        let mut x = Exchange::default();
        for name in ["a", "b", "c"] {
            prepare(&mut x, &mut c, &mut s, name, "SELECT 1");
        }
        // "a" bound again: "b" is now the least recently used.
        send(
            &mut x,
            &mut c,
            &mut s,
            &[bind("a"), msg(b'S', b"")].concat(),
        );
        assert_eq!(s.least_used(2), vec![b"__dbp4_2".to_vec()]);
        assert_eq!(
            s.least_used(1),
            vec![b"__dbp4_2".to_vec(), b"__dbp4_3".to_vec()]
        );
        assert!(s.least_used(3).is_empty());
        s.forget(&s.least_used(2));
        assert_eq!(s.len(), 2);
        // The client's "b" is prepared again where it is bound next.
        let mut x = Exchange::default();
        let sent = send(
            &mut x,
            &mut c,
            &mut s,
            &[bind("b"), msg(b'S', b"")].concat(),
        );
        assert_eq!(tags(&sent), "PBS");
    }

    #[test]
    fn parses_up_to_a_sync_are_answered_without_a_server() {
        let mut c = ClientStatements::new(2);
        let input = [
            parse("a", "SELECT 1"),
            parse("b", "SET x.y = 1"),
            msg(b'S', b""),
            bind("a"),
        ]
        .concat();
        let mut out = Vec::new();
        let n = answer_parses(&mut c, &input, &mut out).unwrap();
        assert_eq!(n, input.len() - bind("a").len());
        assert_eq!(split(&out).iter().map(|m| m.0).collect::<String>(), "11Z");
        assert_eq!(c.len(), 2);
        // Bound later on a server: prepared there first, and its text is heard of.
        let (mut x, mut s) = (Exchange::default(), ServerStatements::default());
        let mut heard = Vec::new();
        let mut out = Vec::new();
        let input = [bind("b"), msg(b'S', b"")].concat();
        x.from_client(&mut c, &mut s, &input, &mut out, |seen| {
            heard.push(seen.settings)
        })
        .unwrap();
        assert_eq!(split(&out).iter().map(|m| m.0).collect::<String>(), "PBS");
        assert_eq!(heard, [true]);
        // Not answered here: an unnamed or known name, anything but Parse, no Sync yet.
        for input in [
            [parse("", "SELECT 1"), msg(b'S', b"")].concat(),
            [parse("a", "SELECT 1"), msg(b'S', b"")].concat(),
            [parse("c", "SELECT 1"), msg(b'D', b"Sc\0"), msg(b'S', b"")].concat(),
            parse("d", "SELECT 1"),
            msg(b'S', b""),
        ] {
            assert_eq!(answer_parses(&mut c, &input, &mut Vec::new()), None);
        }
    }

    #[test]
    fn a_fatal_error_is_held_back_and_others_pass_whole() {
        let mut c = ClientStatements::new(1);
        let (mut x, mut s) = (Exchange::default(), ServerStatements::default());
        send(&mut x, &mut c, &mut s, &msg(b'Q', b"SELECT 1\0"));
        let error = msg(b'E', b"SERROR\0VERROR\0C22012\0Mdivision by zero\0\0");
        let reply = [error.clone(), msg(b'Z', b"I")].concat();
        let mut got = Vec::new();
        for piece in reply.chunks(3) {
            got.extend(answer(&mut x, &mut c, &mut s, piece));
        }
        assert_eq!(got, reply);
        assert_eq!(x.take_fatal(), None);
        send(&mut x, &mut c, &mut s, &msg(b'Q', b"SELECT 2\0"));
        let fatal = msg(
            b'E',
            b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to unexpected postmaster exit\0\0",
        );
        assert_eq!(answer(&mut x, &mut c, &mut s, &fatal), b"");
        assert_eq!(
            x.take_fatal().as_deref(),
            Some("terminating connection due to unexpected postmaster exit")
        );
    }
}
