//! A core's pool of PostgreSQL server connections for one target group's route (its
//! writer, or its readers): idle connections by login and database, most recently used
//! first; new ones opened within the group's `max_connections` (shared by every core);
//! borrowers that find neither wait for a check-in on this core, for budget another core
//! frees (every core closes an idle connection for each such borrower), or for the
//! topology to name a target.

use crate::io::Detached;
use crate::io::Driver;
use crate::pg_server::{self, PgServer, PgServerError};
use crate::pool::Permit;
use crate::pool::{GroupShared, PgHandoff};
use crate::secrets::BackendLogin;
use crate::topology::Choice;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// An idle connection older than this is checked for liveness before it is lent.
const CHECK_IDLE_AFTER: Duration = Duration::from_millis(100);

/// A connection that could not be opened is tried again after this (or as soon as the
/// topology changes).
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// A connection on its way from another core.
type Moved = Box<dyn std::any::Any + Send>;

/// How long a borrower waits for its own core's connections before it asks the other
/// cores too (at once when its core holds less than its share).
const ASK_OTHER_CORES_AFTER: std::time::Duration = std::time::Duration::from_millis(20);

/// How long the test-only check-in verification may take.
const VERIFY_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether a failed opening may work a moment later: the server is down, restarting or
/// shutting down (class 57: operator intervention), rather than refusing the login.
fn transient(e: &PgServerError) -> bool {
    match e {
        PgServerError::Open(crate::postgres::backend::OpenError::Refused { code, .. }) => {
            code.starts_with("57")
        }
        PgServerError::Open(_) | PgServerError::Tls(_) => false,
        PgServerError::Io(_)
        | PgServerError::Protocol(_)
        | PgServerError::Overdue
        | PgServerError::Closed
        | PgServerError::Unexpected(_) => true,
    }
}

/// How often a core's maintenance looks at its idle connections without being asked.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// Why no connection could be lent.
#[derive(Debug, thiserror::Error)]
pub enum BorrowError {
    #[error("timed out waiting for a database connection (connection_borrow_timeout)")]
    Timeout,
    #[error("no database to connect to: {0}")]
    NoTarget(String),
    #[error("cannot connect to the database: {0}")]
    Connect(PgServerError),
}

/// A connection lent to a client, with its share of the budget.
pub struct Lease<S> {
    pub server: PgServer<S>,
    /// The target it is on, and the target's epoch (a failover makes it stale).
    pub target: usize,
    pub epoch: u64,
    /// When it went idle.
    idle_since: Instant,
    _permit: Permit,
    /// The client's user's place under its `max_database_connections`, while it holds the
    /// connection.
    pub tenant: Option<crate::tenants::TenantPermit>,
}

impl<S> Lease<S> {
    /// The same lease over another form of its connection's stream (moving it between
    /// cores).
    fn map_stream<T>(self, f: impl FnOnce(S) -> std::io::Result<T>) -> std::io::Result<Lease<T>> {
        Ok(Lease {
            server: self.server.map_stream(f)?,
            target: self.target,
            epoch: self.epoch,
            idle_since: self.idle_since,
            _permit: self._permit,
            tenant: self.tenant,
        })
    }
}

/// A borrower waiting on this core for a connection with its login and database.
struct Waiter<S> {
    login: u64,
    database: String,
    /// Its tenant, for fair turns among the waiters of one login and database.
    class: crate::pool::Class,
    tx: oneshot::Sender<Lease<S>>,
}

/// One core's pool for one group route.
pub struct PgPool<D: Driver> {
    pub shared: Arc<GroupShared>,
    idle: RefCell<Vec<Lease<D::Stream>>>,
    waiters: RefCell<VecDeque<Waiter<D::Stream>>>,
    /// Whose turn it is among the waiters' tenants.
    turns: RefCell<crate::pool::Turns>,
    /// Connections this core has lent and not had back.
    lent: std::cell::Cell<usize>,
    /// Startup settings as this group's servers spell them.
    pub spellings: RefCell<crate::session::postgres::Spellings>,
}

impl<D: Driver> PgPool<D> {
    pub fn new(shared: Arc<GroupShared>) -> Rc<Self> {
        shared.pg_cores.fetch_add(1, Ordering::Relaxed);
        Rc::new(PgPool {
            shared,
            idle: RefCell::default(),
            waiters: RefCell::default(),
            turns: RefCell::default(),
            lent: std::cell::Cell::new(0),
            spellings: RefCell::default(),
        })
    }

    /// This core's share of the budget when every core's borrowers wait.
    fn share(&self) -> usize {
        let cores = self.shared.pg_cores.load(Ordering::Relaxed).max(1);
        self.shared.max_connections().div_ceil(cores)
    }

    /// Idle connections on this core.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }

    /// A connection logged in as `login` to `database`, within
    /// `connection_borrow_timeout`.
    pub async fn borrow(
        self: &Rc<Self>,
        login: &Arc<BackendLogin>,
        database: &str,
        class: crate::pool::Class,
    ) -> Result<Lease<D::Stream>, BorrowError> {
        let sh = &self.shared;
        let settings = sh.settings();
        if let Some(l) = self.take_idle(login.id, database) {
            sh.stats.borrow_immediate.add(1);
            sh.stats.borrowed.add(1);
            self.lent.set(self.lent.get() + 1);
            return Ok(l);
        }
        let started = crate::rt::time::now();
        let deadline = started + settings.borrow_timeout;
        sh.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let got = self.borrow_waiting(login, database, deadline, class).await;
        sh.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        match &got {
            Ok(_) => {
                self.lent.set(self.lent.get() + 1);
                sh.stats.borrowed.add(1);
                sh.stats
                    .borrow_wait
                    .observe(crate::rt::time::now().saturating_duration_since(started));
            }
            Err(BorrowError::Timeout) => {
                sh.stats.borrow_timeouts.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        got
    }

    async fn borrow_waiting(
        self: &Rc<Self>,
        login: &Arc<BackendLogin>,
        database: &str,
        deadline: Instant,
        class: crate::pool::Class,
    ) -> Result<Lease<D::Stream>, BorrowError> {
        let sh = &self.shared;
        loop {
            if let Some(l) = self.take_idle(login.id, database) {
                return Ok(l);
            }
            let changed = sh.topology.changed();
            let choice = sh.topology.load().choose(sh.route, &sh.borrowed_at);
            let (target, epoch) = match choice {
                Choice::Target(t, e) => (t, e),
                Choice::Fail(why) => return Err(BorrowError::NoTarget(why)),
                Choice::Wait(why) => {
                    tokio::select! {
                        _ = changed => continue,
                        _ = crate::rt::time::sleep_until(deadline) => {
                            return Err(BorrowError::NoTarget(why));
                        }
                    }
                }
            };
            let opened = if let Some(permit) = sh.budget.try_take() {
                self.open(permit, target, epoch, login, database, deadline)
                    .await
            } else {
                // Budget held by idle connections of other logins here: close one.
                if self.close_idle_other(login.id, database) {
                    continue;
                }
                let (tx, mut rx) = oneshot::channel();
                self.waiters.borrow_mut().push_back(Waiter {
                    login: login.id,
                    database: database.to_string(),
                    class,
                    tx,
                });
                // It waits for one from another core too (an idle one there, or one
                // handed over as it is let go): at once when this core holds less than
                // its share of the budget, else once its own have not come back for a
                // while (they may be held for long: a pinned client, a long transaction).
                let far: RefCell<Option<oneshot::Receiver<Moved>>> = RefCell::new(None);
                let from_far = async {
                    if self.lent.get() >= self.share() {
                        crate::rt::time::sleep(ASK_OTHER_CORES_AFTER).await;
                    }
                    let (far_tx, far_rx) = oneshot::channel();
                    *far.borrow_mut() = Some(far_rx);
                    sh.pg_handoff.lock().push_back(PgHandoff {
                        login: login.id,
                        database: database.to_string(),
                        thread: std::thread::current().id(),
                        tx: far_tx,
                    });
                    sh.wanted.fetch_add(1, Ordering::AcqRel);
                    sh.wanted_notify.notify_waiters();
                    std::future::poll_fn(|cx| match far.borrow_mut().as_mut() {
                        Some(r) => {
                            std::future::Future::poll(std::pin::Pin::new(r), cx).map(Result::ok)
                        }
                        None => std::task::Poll::Ready(None),
                    })
                    .await
                };
                let outcome = tokio::select! {
                    l = &mut rx => l.ok().map(Ok),
                    moved = from_far => moved.and_then(|m| self.adopt(m)).map(Ok),
                    p = sh.budget.take() => match p {
                        Some(p) => Some(self.open(p, target, epoch, login, database, deadline).await),
                        None => None,
                    },
                    _ = crate::rt::time::sleep_until(deadline) => Some(Err(BorrowError::Timeout)),
                };
                // A connection may have been given on the way that lost the race: it goes
                // back to the pool rather than being dropped (closed unaccounted).
                rx.close();
                if let Ok(extra) = rx.try_recv() {
                    self.lent.set(self.lent.get() + 1);
                    self.put_back(extra);
                }
                if let Some(mut far_rx) = far.borrow_mut().take() {
                    let _ = sh
                        .wanted
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1));
                    far_rx.close();
                    if let Some(extra) = far_rx.try_recv().ok().and_then(|m| self.adopt(m)) {
                        self.lent.set(self.lent.get() + 1);
                        self.put_back(extra);
                    }
                }
                match outcome {
                    Some(o) => o,
                    None => continue,
                }
            };
            match opened {
                Err(BorrowError::Connect(e)) if transient(&e) => {
                    // The target is suspected: wait for the monitor's word on it (a
                    // failover names another), then try again, within the deadline.
                    tokio::select! {
                        _ = changed => {}
                        _ = crate::rt::time::sleep(RETRY_AFTER) => {}
                    }
                    if crate::rt::time::now() >= deadline {
                        return Err(BorrowError::Connect(e));
                    }
                }
                other => return other,
            }
        }
    }

    /// Opens a new connection on `target` with `permit`.
    async fn open(
        &self,
        permit: Permit,
        target: usize,
        epoch: u64,
        login: &Arc<BackendLogin>,
        database: &str,
        borrow_deadline: Instant,
    ) -> Result<Lease<D::Stream>, BorrowError> {
        let sh = &self.shared;
        let settings = sh.settings();
        let deadline = (crate::rt::time::now() + settings.connect_timeout).min(borrow_deadline);
        let addr = sh
            .topology
            .load()
            .addr(target)
            .cloned()
            .ok_or_else(|| BorrowError::NoTarget("the target has no address yet".into()))?;
        let name = sh.target_name(&addr);
        let opened = async {
            let tls = crate::backend_conn::TlsTo::for_addr(&sh.backend_tls, &name, &addr);
            let connect = || async {
                crate::rt::time::timeout_at(deadline, D::connect(&addr))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
            };
            let mut server =
                pg_server::connect_login(connect, &addr, login, database, tls, deadline).await?;
            if !sh.init_query.is_empty() {
                let a = server.query(&sh.init_query, deadline).await?;
                if let Some(e) = a.error {
                    return Err(PgServerError::Io(std::io::Error::other(format!(
                        "init_query failed: {e}"
                    ))));
                }
            }
            Ok(server)
        }
        .await;
        match opened {
            Ok(server) => {
                sh.stats.opened.fetch_add(1, Ordering::Relaxed);
                sh.pg_params
                    .lock()
                    .insert(login.id, server.reported.clone());
                Ok(Lease {
                    server,
                    target,
                    epoch,
                    idle_since: crate::rt::time::now(),
                    _permit: permit,
                    tenant: None,
                })
            }
            Err(e) => {
                sh.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                if transient(&e) {
                    sh.topology.suspect(target);
                }
                Err(BorrowError::Connect(e))
            }
        }
    }

    /// The most recently idle connection for this login and database that may still
    /// serve (its target in the same role and epoch, alive).
    fn take_idle(&self, login: u64, database: &str) -> Option<Lease<D::Stream>> {
        let snap = self.shared.topology.load();
        let now = crate::rt::time::now();
        let mut idle = self.idle.borrow_mut();
        while let Some(i) = idle
            .iter()
            .rposition(|l| l.server.login.id == login && l.server.database == database)
        {
            let l = idle.remove(i);
            self.shared.idle_total.fetch_sub(1, Ordering::Relaxed);
            let fit = snap.valid(self.shared.route, l.target, l.epoch)
                && (now.saturating_duration_since(l.idle_since) < CHECK_IDLE_AFTER
                    || crate::io::Stream::idle_healthy(&l.server.stream));
            if fit {
                return Some(l);
            }
            self.closed();
        }
        None
    }

    /// Closes the oldest idle connection of another login or database; true if one was.
    fn close_idle_other(&self, login: u64, database: &str) -> bool {
        let mut idle = self.idle.borrow_mut();
        match idle
            .iter()
            .position(|l| l.server.login.id != login || l.server.database != database)
        {
            Some(i) => {
                drop(idle.remove(i));
                self.shared.idle_total.fetch_sub(1, Ordering::Relaxed);
                self.closed();
                true
            }
            None => false,
        }
    }

    fn closed(&self) {
        self.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection back from a client, settled (no transaction, nothing outstanding):
    /// to a waiter for it on this core, or idle, or closed (too old, too many idle, the
    /// budget shrank, its target no longer serves this route).
    /// With the test-only `verify_checkin`, the session is first compared with dbproxy's
    /// record of it ([`crate::pg_verify`]); a connection that differs is logged, counted
    /// and closed.
    pub fn release(self: &Rc<Self>, mut lease: Lease<D::Stream>) {
        lease.tenant = None;
        if !self.shared.verify_checkin {
            self.put_back(lease);
            return;
        }
        let pool = self.clone();
        crate::rt::spawn(async move { pool.verify_then_put_back(lease).await });
    }

    async fn verify_then_put_back(&self, mut lease: Lease<D::Stream>) {
        let stats = &self.shared.stats;
        let server = &mut lease.server;
        let deadline = crate::rt::time::now() + VERIFY_LIMIT;
        let found = match server
            .query(&crate::pg_verify::sql(&server.settings), deadline)
            .await
        {
            Ok(a) if a.error.is_none() => crate::pg_verify::differences(
                &a.rows,
                &server.settings,
                &server.statements,
                &server.user,
            ),
            Ok(a) => vec![format!("the verification query failed: {:?}", a.error)],
            Err(e) => {
                tracing::warn!(group = %self.shared.name, pid = server.pid, "check-in verification could not run: {e}");
                self.discard(lease);
                return;
            }
        };
        if found.is_empty() {
            stats.checkins_verified.fetch_add(1, Ordering::Relaxed);
            self.put_back(lease);
        } else {
            stats.checkin_violations.fetch_add(1, Ordering::Relaxed);
            tracing::error!(group = %self.shared.name, pid = server.pid, "check-in verification failed: {}", found.join("; "));
            self.discard(lease);
        }
    }

    fn put_back(&self, mut lease: Lease<D::Stream>) {
        self.lent.set(self.lent.get().saturating_sub(1));
        let sh = &self.shared;
        let settings = sh.settings();
        let now = crate::rt::time::now();
        let too_old = !settings.max_lifetime.is_zero()
            && now.saturating_duration_since(lease.server.created) >= settings.max_lifetime;
        let valid = sh
            .topology
            .load()
            .valid(sh.route, lease.target, lease.epoch);
        if too_old || !valid || sh.budget.over() {
            self.close_lease(lease);
            return;
        }
        lease.idle_since = now;
        // Borrowers that wait on other cores are in the group's queue, oldest first: a
        // core that holds its share of the budget or more gives the connection to the
        // oldest one for a connection like this when it is elsewhere (a core's own
        // borrowers do not starve the others').
        if sh.wanted.load(Ordering::Acquire) > 0 && self.lent.get() + 1 >= self.share() {
            let elsewhere = {
                let mut queue = sh.pg_handoff.lock();
                queue.retain(|w| !w.tx.is_closed());
                queue
                    .iter()
                    .find(|w| {
                        w.login == lease.server.login.id && w.database == lease.server.database
                    })
                    .is_some_and(|w| w.thread != std::thread::current().id())
            };
            if elsewhere {
                match self.hand_over(lease) {
                    Some(back) => lease = back,
                    None => return,
                }
            }
        }
        {
            // To a waiter of the same login and database here: the first of the tenant
            // whose turn it is.
            let mut waiters = self.waiters.borrow_mut();
            waiters.retain(|w| !w.tx.is_closed());
            loop {
                let (login, database) = (lease.server.login.id, &lease.server.database);
                let picked = self.turns.borrow().pick(
                    waiters
                        .iter()
                        .enumerate()
                        .filter(|(_, w)| w.login == login && w.database == *database)
                        .map(|(i, w)| (i, w.class)),
                );
                let Some((i, pass)) = picked else { break };
                let Some(w) = waiters.remove(i) else { break };
                self.turns.borrow_mut().served(w.class, pass);
                match w.tx.send(lease) {
                    Ok(()) => return,
                    Err(back) => lease = back,
                }
            }
        }
        let Some(lease) = self.hand_over(lease) else {
            return;
        };
        let mut idle = self.idle.borrow_mut();
        if idle.len() >= settings.max_idle.max(1) {
            drop(idle);
            self.close_lease(lease);
            return;
        }
        idle.push(lease);
        sh.idle_total.fetch_add(1, Ordering::Relaxed);
        drop(idle);
        // A waiter for another login: free budget for it.
        if self.waiters.borrow().iter().any(|w| !w.tx.is_closed()) {
            if let Some(w) = self.waiters.borrow().front() {
                let (login, db) = (w.login, w.database.clone());
                self.close_idle_other(login, &db);
            }
        }
    }

    /// Gives a connection to a borrower on another core that waits for one like it;
    /// returns it when nobody does.
    fn hand_over(&self, lease: Lease<D::Stream>) -> Option<Lease<D::Stream>> {
        let sh = &self.shared;
        if sh.wanted.load(Ordering::Acquire) == 0 {
            return Some(lease);
        }
        let (login, database) = (lease.server.login.id, lease.server.database.clone());
        let next = || {
            let mut queue = sh.pg_handoff.lock();
            queue.retain(|w| !w.tx.is_closed());
            let i = queue
                .iter()
                .position(|w| w.login == login && w.database == database);
            i.and_then(|i| queue.remove(i))
        };
        let Some(mut waiter) = next() else {
            return Some(lease);
        };
        let mut moving: Box<dyn std::any::Any + Send> = match lease.map_stream(D::detach) {
            Ok(l) => Box::new(l),
            Err(e) => {
                tracing::debug!("cannot move a server connection to another core: {e}");
                self.closed();
                return None;
            }
        };
        loop {
            match waiter.tx.send(moving) {
                Ok(()) => return None,
                // That borrower was served meanwhile: the next one, or it stays here
                // (closing it would cost a new connection).
                Err(back) => moving = back,
            }
            match next() {
                Some(w) => waiter = w,
                None => break,
            }
        }
        let lease = moving.downcast::<Lease<Detached>>().ok()?;
        match lease.map_stream(D::attach) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!("cannot keep a server connection on its core: {e}");
                self.closed();
                None
            }
        }
    }

    /// A connection another core handed over, attached to this core.
    fn adopt(&self, moved: Box<dyn std::any::Any + Send>) -> Option<Lease<D::Stream>> {
        let lease = moved.downcast::<Lease<Detached>>().ok()?;
        match lease.map_stream(D::attach) {
            Ok(l) => {
                self.shared
                    .stats
                    .moved_between_cores
                    .fetch_add(1, Ordering::Relaxed);
                Some(l)
            }
            Err(e) => {
                tracing::debug!("cannot adopt a server connection from another core: {e}");
                self.closed();
                None
            }
        }
    }

    /// Closes a connection that must not serve again.
    pub fn discard(&self, lease: Lease<D::Stream>) {
        self.lent.set(self.lent.get().saturating_sub(1));
        self.close_lease(lease);
    }

    fn close_lease(&self, lease: Lease<D::Stream>) {
        self.closed();
        crate::rt::spawn(lease.server.quit());
    }

    /// This core's upkeep until shutdown: idle connections past their lifetime or dead
    /// closed, and one closed for each borrower elsewhere that waits for budget.
    pub async fn maintain(self: Rc<Self>) {
        let sh = self.shared.clone();
        loop {
            let wanted = sh.wanted_notify.notified();
            tokio::select! {
                _ = wanted => {}
                _ = crate::rt::time::sleep(MAINTAIN_EVERY) => {}
            }
            let settings = sh.settings();
            let now = crate::rt::time::now();
            let mut idle = self.idle.borrow_mut();
            let before = idle.len();
            idle.retain(|l| {
                let old = !settings.max_lifetime.is_zero()
                    && now.saturating_duration_since(l.server.created) >= settings.max_lifetime;
                !old && crate::io::Stream::idle_healthy(&l.server.stream)
            });
            let pruned = before - idle.len();
            drop(idle);
            for _ in 0..pruned {
                sh.idle_total.fetch_sub(1, Ordering::Relaxed);
                self.closed();
            }
            // Borrowers elsewhere that wait: an idle connection like theirs moves to them;
            // failing that, an idle one of another login is closed to free budget.
            while sh.wanted.load(Ordering::Acquire) > 0 {
                let Some(lease) = self.idle.borrow_mut().pop() else {
                    break;
                };
                sh.idle_total.fetch_sub(1, Ordering::Relaxed);
                match self.hand_over(lease) {
                    None => continue,
                    Some(lease) => {
                        // Nobody waits for one like it: it is closed only to free budget
                        // for a borrower of another login or database, and kept else.
                        let other = sh.pg_handoff.lock().iter().any(|w| {
                            !w.tx.is_closed()
                                && (w.login != lease.server.login.id
                                    || w.database != lease.server.database)
                        });
                        if other {
                            drop(lease);
                            self.closed();
                        } else {
                            self.idle.borrow_mut().push(lease);
                            sh.idle_total.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Closes every idle connection (shutdown).
    pub async fn close_idle(&self) {
        let idle: Vec<_> = self.idle.borrow_mut().drain(..).collect();
        for l in idle {
            self.shared.idle_total.fetch_sub(1, Ordering::Relaxed);
            self.closed();
            l.server.quit().await;
        }
    }
}
