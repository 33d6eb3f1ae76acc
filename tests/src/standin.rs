//! A stand-in database server for what no MariaDB here does: it greets, logs clients in
//! (any login, or MySQL 8.4's caching_sha2_password with full authentication every time:
//! the password over TLS, or RSA-encrypted with its public key without TLS), answers
//! dbproxy's health checks as a writable server, and every other command with OK. Faults
//! can be switched on while it runs: a reset in the middle of the login, or silence on a
//! given statement.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Faults the stand-in plays while they are on.
#[derive(Default)]
pub struct Faults {
    /// New connections are reset (RST) right after the client's handshake response.
    pub reset_login: AtomicBool,
    /// A COM_QUERY starting with `stall_on` gets no answer, ever.
    pub stall: AtomicBool,
    pub stall_on: Vec<u8>,
}

/// How the stand-in logs clients in.
#[derive(Clone)]
pub enum Auth {
    /// Any login is accepted (mysql_native_password greeting, answer not checked).
    Any,
    /// caching_sha2_password with an empty cache: full authentication for `password`.
    /// With `tls`, CLIENT_SSL is offered (and a login that did not use it must use RSA).
    Sha2Full {
        password: String,
        key: Arc<rsa::RsaPrivateKey>,
        tls: Option<Arc<rustls::ServerConfig>>,
    },
}

/// A running stand-in.
pub struct StandIn {
    pub port: u16,
    /// How each successful full authentication got the password: "tls" or "rsa".
    pub logins: Arc<Mutex<Vec<&'static str>>>,
    pub faults: Arc<Faults>,
}

const NONCE: &[u8; 20] = b"abcdefghijklmnopqrst";

trait Rw: Read + Write {}
impl<T: Read + Write> Rw for T {}

impl StandIn {
    pub fn start(auth: Auth) -> StandIn {
        Self::with_faults(auth, Faults::default())
    }

    /// A stand-in whose `faults` the test switches on and off.
    pub fn with_faults(auth: Auth, faults: Faults) -> StandIn {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let logins: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let seen = logins.clone();
        let faults = Arc::new(faults);
        let f = faults.clone();
        std::thread::spawn(move || {
            for (id, s) in l.incoming().flatten().enumerate() {
                let (auth, seen, f) = (auth.clone(), seen.clone(), f.clone());
                std::thread::spawn(move || serve(s, id as u32 + 1, &auth, &seen, &f));
            }
        });
        StandIn {
            port,
            logins,
            faults,
        }
    }
}

/// Closes `s` with a reset (SO_LINGER 0) instead of a FIN.
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the length given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

fn serve(
    s: TcpStream,
    id: u32,
    auth: &Auth,
    seen: &Mutex<Vec<&'static str>>,
    faults: &Faults,
) -> Option<()> {
    let mut caps: u32 = 0x1
        | 0x2
        | 0x4
        | 0x8
        | 0x200
        | 0x2000
        | 0x8000
        | 0x10000
        | 0x20000
        | 0x40000
        | 0x80000
        | 0x100000
        | 0x200000
        | 0x800000
        | 0x1000000;
    let (version, plugin) = match auth {
        Auth::Any => (&b"10.11.0-standin\0"[..], &b"mysql_native_password\0"[..]),
        Auth::Sha2Full { tls, .. } => {
            if tls.is_some() {
                caps |= 0x800;
            }
            (&b"8.4.0-standin\0"[..], &b"caching_sha2_password\0"[..])
        }
    };
    let mut g = vec![10];
    g.extend_from_slice(version);
    g.extend_from_slice(&id.to_le_bytes());
    g.extend_from_slice(&NONCE[..8]);
    g.push(0);
    g.extend_from_slice(&(caps as u16).to_le_bytes());
    g.push(45);
    g.extend_from_slice(&2u16.to_le_bytes());
    g.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
    g.push(21);
    g.extend_from_slice(&[0; 10]);
    g.extend_from_slice(&NONCE[8..]);
    g.push(0);
    g.extend_from_slice(plugin);
    let mut tcp = s;
    write(&mut tcp, 0, &g)?;
    let (mut seq, p) = read(&mut tcp)?;
    if faults.reset_login.load(Ordering::Relaxed) {
        reset(tcp);
        return None;
    }
    let ssl_request = p.len() == 32 && p.get(1).is_some_and(|b| b & 0x08 != 0);
    let mut s: Box<dyn Rw> = match auth {
        Auth::Sha2Full { tls: Some(cfg), .. } if ssl_request => {
            // The rest of the login inside TLS.
            let conn = rustls::ServerConnection::new(cfg.clone()).ok()?;
            let mut s: Box<dyn Rw> = Box::new(rustls::StreamOwned::new(conn, tcp));
            seq = read(&mut s)?.0;
            s
        }
        _ => Box::new(tcp),
    };
    if let Auth::Sha2Full { .. } = auth {
        seq = login_sha2(&mut s, seq, auth, ssl_request, seen)?;
    }
    let ok = [0u8, 0, 0, 2, 0, 0, 0];
    write(&mut s, seq.wrapping_add(1), &ok)?;
    commands(&mut s, faults)
}

/// Full authentication after the client's first answer (at `seq`); returns the sequence id
/// the final OK follows.
fn login_sha2(
    s: &mut Box<dyn Rw>,
    seq: u8,
    auth: &Auth,
    tls: bool,
    seen: &Mutex<Vec<&'static str>>,
) -> Option<u8> {
    let Auth::Sha2Full { password, key, .. } = auth else {
        return Some(seq);
    };
    let mut want = password.as_bytes().to_vec();
    want.push(0);
    // "Perform full authentication".
    write(s, seq.wrapping_add(1), &[0x01, 0x04])?;
    let (seq, answer) = read(s)?;
    let (seq, got, how) = if tls {
        (seq, answer, "tls")
    } else if answer == [0x02] {
        use rsa::pkcs8::EncodePublicKey;
        let pem = key
            .to_public_key()
            .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
            .ok()?;
        let mut more = vec![0x01];
        more.extend_from_slice(pem.as_bytes());
        write(s, seq.wrapping_add(1), &more)?;
        let (seq, sealed) = read(s)?;
        let opened = key
            .decrypt(rsa::Oaep::new::<sha1::Sha1>(), &sealed)
            .unwrap_or_default();
        let plain: Vec<u8> = opened
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ NONCE[i % NONCE.len()])
            .collect();
        (seq, plain, "rsa")
    } else {
        // A password in clear text without TLS: refused, as MySQL does.
        (seq, Vec::new(), "clear")
    };
    if got != want {
        let mut e = vec![0xff, 0x15, 0x04, b'#'];
        e.extend_from_slice(b"28000Access denied (stand-in)");
        write(s, seq.wrapping_add(1), &e)?;
        return None;
    }
    seen.lock().ok()?.push(how);
    Some(seq)
}

/// Commands until COM_QUIT: the health check's queries get a writable server's answers,
/// everything else OK (nothing for commands without a reply).
fn commands(s: &mut Box<dyn Rw>, faults: &Faults) -> Option<()> {
    let ok = [0u8, 0, 0, 2, 0, 0, 0];
    loop {
        let (seq, p) = read(s)?;
        let query = |q: &[u8]| p.first() == Some(&3) && p.get(1..) == Some(q);
        let stalled = faults.stall.load(Ordering::Relaxed)
            && p.first() == Some(&3)
            && p.get(1..).is_some_and(|q| q.starts_with(&faults.stall_on));
        if stalled {
            // Silence until the client gives up and closes.
            while read(s).is_some() {}
            return None;
        }
        let answer: Option<&[&str]> =
            if query(b"SELECT @@global.read_only, @@global.innodb_read_only") {
                Some(&["0", "0"])
            } else if query(b"SHOW ALL SLAVES STATUS") || query(b"SHOW REPLICA STATUS") {
                Some(&[])
            } else {
                None
            };
        match (p.first(), answer) {
            (Some(1), _) => return Some(()),
            (Some(0x19 | 0x18), _) => {}
            (_, Some(row)) => {
                let mut seq = seq;
                let columns = row.len().max(1);
                let mut packets = vec![vec![columns as u8]];
                for _ in 0..columns {
                    let mut d = Vec::new();
                    for f in ["def", "", "", "", "v", ""] {
                        d.push(f.len() as u8);
                        d.extend_from_slice(f.as_bytes());
                    }
                    d.extend_from_slice(&[0x0c, 33, 0, 1, 0, 0, 0, 253, 0, 0, 0, 0, 0]);
                    packets.push(d);
                }
                let eof = vec![0xfe, 0, 0, 2, 0];
                packets.push(eof.clone());
                if !row.is_empty() {
                    let mut r = Vec::new();
                    for v in row.iter() {
                        r.push(v.len() as u8);
                        r.extend_from_slice(v.as_bytes());
                    }
                    packets.push(r);
                }
                packets.push(eof);
                for pk in packets {
                    seq = seq.wrapping_add(1);
                    write(s, seq, &pk)?;
                }
            }
            _ => write(s, seq.wrapping_add(1), &ok)?,
        }
    }
}

fn read<S: Read + ?Sized>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).ok()?;
    let mut p = vec![0; u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize];
    s.read_exact(&mut p).ok()?;
    Some((h[3], p))
}

fn write<S: Write + ?Sized>(s: &mut S, seq: u8, p: &[u8]) -> Option<()> {
    let mut out = (p.len() as u32).to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(p);
    s.write_all(&out).ok()?;
    s.flush().ok()
}
