//! The connection phase driven over the client socket: the login, and the phase a
//! COM_CHANGE_USER runs (reads, writes, the TLS handshake, token verification, the waits
//! the phase asks for).

use super::*;

/// The endpoint a client came through: what TLS it allows, its counters.
pub(super) struct Via {
    pub(super) tls: ClientTls,
    pub(super) endpoint: Arc<EndpointStats>,
}

/// The connection phase, driving [`ConnectionPhase`]: reads, writes, the TLS handshake,
/// token verification and the waits it asks for. Returns the connection and the sequence
/// id of the final OK.
pub(super) async fn login<D: Driver>(
    shared: Arc<ProxyShared>,
    pool: Rc<CorePool<D>>,
    mut client: D::Stream,
    peer: SocketAddr,
    conn_id: u32,
    Via { tls, endpoint }: Via,
    split: Option<(crate::routing::Split, Rc<CorePool<D>>)>,
) -> Option<(Conn<D>, u8)> {
    let tls = if shared.tls.is_some() {
        tls
    } else {
        ClientTls::Off
    };
    let profile = {
        let p = pool.shared.profile.read();
        Profile {
            version: p.version.clone(),
            capabilities: p.capabilities,
            ext_capabilities: p.ext_capabilities,
            collation: p.collation,
        }
    };
    let handshake_timeout = shared.config().proxy.handshake_timeout;
    let now = crate::rt::time::now();
    let mut phase = ConnectionPhase::start(
        &profile,
        conn_id,
        new_nonce(),
        peer.ip(),
        tls,
        handshake_timeout,
        now,
    );
    let mut cbuf = Buf::with_capacity(CLIENT_BUF);
    let (a, ok_seq) = drive_phase::<D>(
        &mut phase,
        &mut client,
        &mut cbuf,
        &shared,
        peer,
        Some(&endpoint),
    )
    .await?;
    let mut s = ClientSession::new(a.user, a.caps, a.collation, a.database);
    s.ext_caps = a.ext_caps;
    s.exclude_variable_sets = pool.shared.settings().exclude_variable_sets;
    let origin = crate::clients::Origin {
        // A Unix socket client is known by the socket it came through.
        peer: (!endpoint.listen.starts_with("unix:")).then_some(peer),
        endpoint: Some(endpoint.clone()),
        tls: client.is_tls(),
        since: crate::stats::unix_now(),
    };
    let slot = ClientSlot::with_origin(conn_id, &s.user.name, &pool.shared.id, origin);
    let conn = Conn {
        reg: shared.sessions.register(slot),
        busy: false,
        key: pool_key(&s),
        shared,
        pool,
        client,
        cbuf,
        cmd: Vec::new(),
        built: Vec::new(),
        to_send: None,
        peer,
        nonce: phase.nonce(),
        s,
        backend: None,
        retry: Vec::new(),
        retryable: false,
        pending: None,
        endpoint,
        in_tx: false,
        timing: false,
        db_sent: None,
        tenant: None,
        split: split.map(|(s, reader)| Box::new(super::split::SplitRoute::new(s, reader))),
    };
    Some((conn, ok_seq))
}

/// Drives a [`ConnectionPhase`] over `client`: reads, writes, the TLS handshake, token
/// verification and the waits it asks for. `Some`: the client proved who it is; the final
/// OK, at the sequence id given, is the caller's to send. `None`: the phase ended without
/// that, the client was told and the reason logged. `endpoint` counts refused credentials
/// (a login's; a COM_CHANGE_USER's are not a connection's setup).
pub(super) async fn drive_phase<D: Driver>(
    phase: &mut ConnectionPhase,
    client: &mut D::Stream,
    cbuf: &mut Buf,
    shared: &ProxyShared,
    peer: SocketAddr,
    endpoint: Option<&EndpointStats>,
) -> Option<(Accepted, u8)> {
    let deadline = phase.deadline();
    loop {
        let Some(action) = phase.poll_action() else {
            // No deadline: the phase is over (its last action was taken).
            let input_at = phase.poll_timeout()?;
            if !phase.wants_packet() {
                // The throttle holds the verdict.
                crate::rt::time::sleep_until(input_at).await;
                phase.handle(
                    Input::Timer,
                    crate::rt::time::now(),
                    &shared.users(),
                    &shared.throttle,
                );
                continue;
            }
            let read = read_packet_by(client, cbuf, HANDSHAKE_LIMIT, Some(input_at)).await;
            let input = match read {
                Ok(h) => Input::Packet {
                    seq: h.seq,
                    payload: &cbuf.filled()[4..h.total()],
                },
                Err(e) if e.kind() == io::ErrorKind::TimedOut => Input::Timer,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::debug!(%peer, "client left during the handshake: {e}");
                    Input::Malformed
                }
                Err(e) => {
                    tracing::debug!(%peer, "client left during the handshake: {e}");
                    return None;
                }
            };
            let consumed = match &input {
                Input::Packet { payload, .. } => payload.len() + 4,
                _ => 0,
            };
            phase.handle(
                input,
                crate::rt::time::now(),
                &shared.users(),
                &shared.throttle,
            );
            cbuf.consume(consumed);
            continue;
        };
        match action {
            Action::Send { seq, payload } => {
                write_packet(client, seq, &payload).await.ok()?;
            }
            Action::StartTls => {
                // Whatever came after the SSLRequest is the start of the TLS handshake.
                let early = cbuf.filled().to_vec();
                cbuf.consume(early.len());
                let result = match shared.tls.as_ref() {
                    // Boxed: the handshake's state (rustls's connection among it) lives on
                    // the heap while it runs, not in every session's future.
                    Some(server) => Box::pin(client.accept_tls(server.config(), &early, deadline))
                        .await
                        .map(|agreed| {
                            tracing::debug!(%peer, version = agreed.version, cipher = %agreed.cipher, "client TLS handshake done");
                        })
                        .map_err(|e| e.to_string()),
                    None => Err("no TLS configured".into()),
                };
                let counter = match result {
                    Ok(()) => &shared.tls_stats.client_handshakes,
                    Err(_) => &shared.tls_stats.client_handshake_failures,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let now = crate::rt::time::now();
                phase.handle(
                    Input::Secured(result),
                    now,
                    &shared.users(),
                    &shared.throttle,
                );
            }
            Action::VerifyToken { user, token } => {
                let verdict =
                    crate::rt::time::timeout_at(deadline, verify_token(shared, peer, user, token));
                let ok = verdict.await.unwrap_or(false);
                let now = crate::rt::time::now();
                phase.handle(
                    Input::TokenVerdict(ok),
                    now,
                    &shared.users(),
                    &shared.throttle,
                );
            }
            Action::Close { end, reply } => {
                // The reason is logged before the client is told, so that the line is
                // there for whoever reads the log once the client has its error.
                match end {
                    LoginEnd::Timeout => {
                        let limit = shared.config().proxy.handshake_timeout;
                        tracing::info!(%peer, "client did not log in within handshake_timeout ({limit:?})");
                    }
                    LoginEnd::Denied(log) => {
                        if let Some(endpoint) = endpoint {
                            endpoint.setup_failed_auth.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::info!(%peer, "{log}");
                    }
                    LoginEnd::Refused(log) => tracing::info!(%peer, "{log}"),
                    LoginEnd::TlsFailed(e) => {
                        tracing::info!(%peer, "TLS handshake with a client failed: {e}");
                    }
                    LoginEnd::BadHandshake => {}
                }
                if let Some(r) = reply {
                    write_packet(client, r.seq, &r.payload).await.ok()?;
                }
                return None;
            }
            Action::Accepted { accepted, ok_seq } => return Some((accepted, ok_seq)),
        }
    }
}

/// Verifies a token a client logs in with; the verdict (a refusal is logged with its
/// reason, never the token).
pub(super) async fn verify_token(
    shared: &ProxyShared,
    peer: SocketAddr,
    user: Arc<crate::auth::User>,
    token: crate::auth::Token,
) -> bool {
    let name = user.name.clone();
    let Some(v) = shared.tokens.as_ref() else {
        tracing::info!(%peer, user = %name, "a token was sent, and no token login is configured");
        return false;
    };
    // Boxed: token logins are rare, and idle sessions' futures stay small.
    match Box::pin(v.verify(user, token.0)).await {
        Ok(who) => {
            tracing::info!(%peer, user = %name, identity = %who, "token login");
            true
        }
        Err(why) => {
            tracing::info!(%peer, user = %name, "token refused: {why}");
            false
        }
    }
}
