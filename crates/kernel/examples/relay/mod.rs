//! A tiny thread-per-connection PostgreSQL relay for the tests and the
//! benchmark: relays the login in userspace up to the server's first
//! ReadyForQuery, then either hands the pair to the sockmap
//! ([`Mode::Kernel`]) or keeps copying bytes in userspace
//! ([`Mode::Userspace`]: poll + read + write, one thread per session).
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgferry_kernel::{KernelForwarder, Side, Slot};

#[derive(Clone)]
pub enum Mode {
    Kernel(Arc<KernelForwarder>),
    Userspace,
}

/// One relayed session, as the test sees it.
pub struct Conn {
    pub slot: Mutex<Option<Slot>>,
    pub detach_requested: AtomicBool,
    pub detached: AtomicBool,
}

pub struct Relay {
    pub addr: SocketAddr,
    pub conns: Arc<Mutex<Vec<Arc<Conn>>>>,
}

impl Relay {
    pub fn start(backend: SocketAddr, mode: Mode) -> io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let conns: Arc<Mutex<Vec<Arc<Conn>>>> = Arc::default();
        let list = conns.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let conn = Arc::new(Conn {
                    slot: Mutex::new(None),
                    detach_requested: AtomicBool::new(false),
                    detached: AtomicBool::new(false),
                });
                list.lock().expect("conns").push(conn.clone());
                let mode = mode.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(client, backend, mode, &conn) {
                        if e.kind() != io::ErrorKind::UnexpectedEof {
                            eprintln!("relay: session ended: {e}");
                        }
                    }
                });
            }
        });
        Ok(Relay { addr, conns })
    }
}

fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: `fds` is a live, exclusively borrowed slice of pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn serve(mut client: TcpStream, backend: SocketAddr, mode: Mode, conn: &Conn) -> io::Result<()> {
    client.set_nodelay(true)?;
    // Startup: answer SSLRequest / GSSENCRequest with 'N' ourselves.
    let startup = loop {
        let mut len = [0u8; 4];
        client.read_exact(&mut len)?;
        let n = u32::from_be_bytes(len) as usize;
        if !(8..=10_000).contains(&n) {
            return Err(io::Error::other("bad startup packet"));
        }
        let mut rest = vec![0u8; n - 4];
        client.read_exact(&mut rest)?;
        let code = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if code == 80877103 || code == 80877104 {
            client.write_all(b"N")?;
            continue;
        }
        let mut p = len.to_vec();
        p.extend(rest);
        break p;
    };
    let mut server = TcpStream::connect(backend)?;
    server.set_nodelay(true)?;
    server.write_all(&startup)?;

    // Login: copy both ways until the server's first ReadyForQuery.
    let mut from_server: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let slot = 'login: loop {
        let mut fds = [
            libc::pollfd {
                fd: client.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: server.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        poll(&mut fds, -1)?;
        if fds[0].revents != 0 {
            let n = client.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            server.write_all(&buf[..n])?;
        }
        if fds[1].revents != 0 {
            let n = server.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            from_server.extend_from_slice(&buf[..n]);
            // Forward complete messages; stop at ReadyForQuery.
            let mut at = 0;
            while from_server.len() >= at + 5 {
                let t = from_server[at];
                let len = u32::from_be_bytes([
                    from_server[at + 1],
                    from_server[at + 2],
                    from_server[at + 3],
                    from_server[at + 4],
                ]) as usize;
                if from_server.len() < at + 1 + len {
                    break;
                }
                if t == b'Z' {
                    client.write_all(&from_server[..at])?;
                    let rest = from_server.split_off(at);
                    // Both quiet: the client waits for this ReadyForQuery.
                    let slot = match &mode {
                        Mode::Kernel(fwd) => {
                            let slot = fwd
                                .attach(client.as_raw_fd(), server.as_raw_fd())
                                .map_err(io::Error::other)?;
                            fwd.wrote(&slot, Side::Client, rest.len() as u64);
                            Some(slot)
                        }
                        Mode::Userspace => None,
                    };
                    client.write_all(&rest)?;
                    break 'login slot;
                }
                at += 1 + len;
            }
            client.write_all(&from_server[..at])?;
            from_server.drain(..at);
        }
    };

    if let (Mode::Kernel(fwd), Some(slot)) = (&mode, slot) {
        *conn.slot.lock().expect("slot") = Some(slot);
        // The kernel forwards; wake only for a hang-up or a detach request.
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: client.as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
                libc::pollfd {
                    fd: server.as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            poll(&mut fds, 20)?;
            let hup = libc::POLLRDHUP | libc::POLLHUP;
            if fds[0].revents & hup != 0 || fds[1].revents & hup != 0 {
                if let Some(slot) = conn.slot.lock().expect("slot").take() {
                    fwd.forget(slot);
                }
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                return Ok(());
            }
            if conn.detach_requested.load(Ordering::SeqCst) {
                let slot = conn.slot.lock().expect("slot").take();
                if let Some(slot) = slot {
                    if let Err((slot, e)) = fwd.detach(slot) {
                        *conn.slot.lock().expect("slot") = Some(slot);
                        return Err(io::Error::other(e));
                    }
                }
                conn.detached.store(true, Ordering::SeqCst);
                break;
            }
        }
    }
    copy_both(client, server)
}

/// Userspace forwarding until either side closes.
fn copy_both(mut client: TcpStream, mut server: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: client.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: server.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        poll(&mut fds, 1000)?;
        for (i, f) in fds.iter().enumerate() {
            if f.revents == 0 {
                continue;
            }
            let (from, to) = if i == 0 {
                (&mut client, &mut server)
            } else {
                (&mut server, &mut client)
            };
            let n = match from.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                let _ = to.shutdown(Shutdown::Write);
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                return Ok(());
            }
            to.write_all(&buf[..n])?;
        }
    }
}

pub const SETTLE: Duration = Duration::from_millis(20);
