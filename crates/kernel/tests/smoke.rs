//! Loads the programs and forwards a few messages between two loopback
//! TCP pairs (no PostgreSQL needed).
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use pgferry_kernel::{KernelForwarder, Side};

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

fn msg(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn forwarder() -> Option<KernelForwarder> {
    match KernelForwarder::with_capacity(16) {
        Ok(f) => Some(f),
        Err(e) if e.is_unavailable() => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn forwards_counts_holds_and_detaches() {
    let Some(fwd) = forwarder() else { return };
    // app <-> relay_client ... relay_backend <-> server
    let (mut app, relay_client) = pair();
    let (relay_backend, mut server) = pair();
    let slot = fwd
        .attach(relay_client.as_raw_fd(), relay_backend.as_raw_fd())
        .expect("attach");
    // Several messages in one write (one skb): the parser must frame them.
    let mut req = msg(b'Q', b"select 1\0");
    req.extend(msg(b'P', b"\0select 2\0\0\0"));
    req.extend(msg(b'S', b""));
    app.write_all(&req).expect("write");
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = vec![0u8; req.len()];
    server
        .read_exact(&mut got)
        .expect("server reads the requests");
    assert_eq!(got, req);
    let mut resp = msg(b'T', &[0; 30]);
    resp.extend(msg(b'D', &[7; 100_000])); // longer than a frame
    resp.extend(msg(b'C', b"SELECT 1\0"));
    resp.extend(msg(b'Z', b"T"));
    resp.extend(msg(b'Z', b"I"));
    server.write_all(&resp).expect("write");
    app.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = vec![0u8; resp.len()];
    app.read_exact(&mut got).expect("app reads the responses");
    assert!(got == resp, "response bytes differ");
    let st = fwd.state(&slot).expect("state");
    eprintln!("{st:?}");
    assert_eq!(st.client_syncs, 2);
    assert_eq!(st.server_ready, 2);
    assert_eq!(st.last_status, b'I');
    assert_eq!(st.client_msgs, 3);
    assert_eq!(st.server_msgs, 5);
    assert_eq!(st.bad_headers, 0);

    // Detach while the server is sending 15 MB and the app is reading:
    // nothing may be lost or reordered.
    let mut big = Vec::new();
    for i in 0..5000u32 {
        big.extend(msg(b'D', &vec![(i % 251) as u8; 3000]));
    }
    let writer = {
        let mut s = server.try_clone().expect("clone");
        let big = big.clone();
        std::thread::spawn(move || s.write_all(&big).expect("write big"))
    };
    let reader = {
        let len = big.len();
        std::thread::spawn(move || {
            let mut r = vec![0u8; len];
            app.read_exact(&mut r).expect("app reads big");
            r
        })
    };
    std::thread::sleep(Duration::from_millis(
        std::env::var("DETACH_AFTER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    ));
    fwd.detach(slot).map_err(|(_, e)| e).expect("detach");
    // Userspace relays from now on what is still queued on the sockets.
    let mut relay_client = relay_client;
    let mut relay_backend = relay_backend;
    let mut relayed = 0;
    let mut buf = vec![0u8; 64 * 1024];
    relay_backend.set_nonblocking(true).expect("nb");
    let start = std::time::Instant::now();
    while !reader.is_finished() && start.elapsed() < Duration::from_secs(10) {
        match relay_backend.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                relay_client.write_all(&buf[..n]).expect("fwd");
                relayed += n;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    writer.join().expect("writer");
    let r = reader.join().expect("app thread");
    assert!(r == big, "big response corrupted across the detach");
    eprintln!(
        "detach: {relayed} of {} bytes relayed in userspace after it",
        big.len()
    );
    relay_backend.set_nonblocking(false).expect("b");
}

#[test]
fn hold_at_a_safe_point_then_detach() {
    let Some(fwd) = forwarder() else { return };
    let (mut app, relay_client) = pair();
    let (relay_backend, mut server) = pair();
    let slot = fwd
        .attach(relay_client.as_raw_fd(), relay_backend.as_raw_fd())
        .expect("attach");
    // Server quiet: hold the client; its next message stays in the kernel.
    fwd.hold(&slot, Side::Client).expect("hold");
    let q = msg(b'Q', b"held\0");
    app.write_all(&q).expect("write");
    std::thread::sleep(Duration::from_millis(100));
    server.set_nonblocking(true).expect("nb");
    let mut probe = [0u8; 16];
    assert!(
        server.read(&mut probe).is_err(),
        "held bytes reached the server"
    );
    server.set_nonblocking(false).expect("b");
    assert_eq!(fwd.state(&slot).expect("state").client_msgs, 0);
    fwd.detach(slot).map_err(|(_, e)| e).expect("detach");
    let mut relay_client = relay_client;
    let mut relay_backend = relay_backend;
    relay_client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("t");
    let mut held = vec![0u8; q.len()];
    relay_client.read_exact(&mut held).expect("held query");
    assert_eq!(held, q, "held client bytes");
    relay_backend.write_all(&held).expect("fwd q");
    let mut got = vec![0u8; q.len()];
    server.read_exact(&mut got).expect("server reads q");
    assert_eq!(got, q);
}

#[test]
fn segments_counted_walks_headers_inside_skbs() {
    let fwd = match KernelForwarder::with_framing(4, pgferry_kernel::Framing::SegmentsCounted) {
        Ok(f) => f,
        Err(e) if e.is_unavailable() => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let (mut app, relay_client) = pair();
    let (relay_backend, mut server) = pair();
    let slot = fwd
        .attach(relay_client.as_raw_fd(), relay_backend.as_raw_fd())
        .expect("attach");
    let mut req = msg(b'Q', b"select 1\0");
    req.extend(msg(b'P', b"\0select 2\0\0\0"));
    req.extend(msg(b'S', b""));
    app.write_all(&req).expect("write");
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("t");
    let mut got = vec![0u8; req.len()];
    server.read_exact(&mut got).expect("server reads");
    assert_eq!(got, req);
    let mut resp = msg(b'T', &[0; 30]);
    resp.extend(msg(b'D', &[7; 100_000]));
    resp.extend(msg(b'Z', b"T"));
    server.write_all(&resp).expect("write");
    // A second write: the message after a long one, in a later skb.
    std::thread::sleep(Duration::from_millis(20));
    let tail = msg(b'Z', b"I");
    server.write_all(&tail).expect("write");
    app.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("t");
    let mut got = vec![0u8; resp.len() + tail.len()];
    app.read_exact(&mut got).expect("app reads");
    std::thread::sleep(Duration::from_millis(20));
    let st = fwd.state(&slot).expect("state");
    eprintln!("{st:?}");
    assert_eq!(st.client_syncs, 2);
    assert_eq!(st.server_ready, 2);
    assert_eq!(st.last_status, b'I');
    assert_eq!(st.client_msgs, 3);
    assert_eq!(st.server_msgs, 4);
    assert_eq!(st.bad_headers, 0);
}
