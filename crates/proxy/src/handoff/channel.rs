//! The hand-off socket: a `SOCK_SEQPACKET` Unix socket whose messages are
//! frames with file descriptors attached (`SCM_RIGHTS`).
//!
//! Owns: binding the socket file (0600, never stealing a live one, removed
//! on drop only if still ours), checking the peer's uid, and moving one
//! frame plus its fds per message. A seqpacket message arrives whole, with
//! its fds, or not at all: no reassembly of a byte stream with fds arriving
//! next to some byte in the middle. What the frames mean is the protocol's
//! business (design notes 6.2), not this module's.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr,
};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Largest frame, in bytes. Must stay below what the send buffer can take
/// in one message (see `size_buffers`).
pub const MAX_FRAME: usize = 192 * 1024;
/// Most fds attached to one frame.
pub const MAX_FDS: usize = 8;

/// Linux's per-message limit on passed fds (`include/net/scm.h`). The
/// receive control buffer is sized for this many, so that a peer sending
/// more than `MAX_FDS` still has all of them installed (and closed by us)
/// instead of truncating the control data.
const SCM_MAX_FD: usize = 253;

/// Buffer sizes asked for: a full frame plus the kernel's per-message
/// overhead, so a `MAX_FRAME` message is never `EMSGSIZE`.
const SOCKET_BUFFER: usize = MAX_FRAME + 64 * 1024;

const LISTEN_BACKLOG: i32 = 16;

/// The old process's end: the bound, listening socket.
pub struct HandoffListener {
    /// Dropped before `fd` (field order): the file is removed while the
    /// socket still listens. A successor binding the same path meanwhile
    /// finds it alive and waits; were the socket closed first, it could
    /// take the path (stale) between our "is it still ours?" check and our
    /// removal, and lose its fresh file to it.
    _file: BoundFile,
    fd: AsyncFd<Socket>,
}

/// The socket file we created; removed on drop if the path still names it
/// (a newer pgferry may have replaced it: its file is not ours to delete).
struct BoundFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for BoundFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| m.dev() == self.dev && m.ino() == self.ino)
            .unwrap_or(false);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "removing the hand-off socket file failed");
            }
        }
    }
}

fn seqpacket() -> io::Result<Socket> {
    // socket2 sets FD_CLOEXEC on Linux: the socket must not leak into
    // anything pgferry spawns.
    Socket::new(Domain::UNIX, Type::SEQPACKET, None)
}

/// Best effort: without it a frame over the default send buffer (about
/// 208 KiB less overhead on Linux) fails with `EMSGSIZE`.
fn size_buffers(socket: &Socket) {
    for (what, r) in [
        ("SO_SNDBUF", socket.set_send_buffer_size(SOCKET_BUFFER)),
        ("SO_RCVBUF", socket.set_recv_buffer_size(SOCKET_BUFFER)),
    ] {
        if let Err(e) = r {
            tracing::debug!(option = what, error = %e, "sizing a hand-off socket buffer failed");
        }
    }
}

/// Registers `inner` with tokio's reactor.
fn register<T: AsRawFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: only called with a `Socket` or `OwnedFd`, which own their fd
    // and return the same one from `as_raw_fd` for as long as they live;
    // the AsyncFd owns them, so the fd outlives the registration.
    Ok(unsafe { AsyncFd::register_with_interest(inner, interest) }?)
}

/// Registering panics outside a runtime; make that an error instead.
fn in_runtime() -> io::Result<()> {
    tokio::runtime::Handle::try_current()
        .map(|_| ())
        .map_err(|e| io::Error::other(format!("hand-off socket outside a tokio runtime: {e}")))
}

/// Whether someone listens at `path`: `Err(AddrInUse)` if so, `Ok` if the
/// file is stale (its owner is gone) or already gone.
fn probe_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        // Connecting to a regular file also gives ECONNREFUSED: never
        // delete something that is not a socket.
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    let probe = seqpacket()?;
    // Non-blocking, so a live owner with a full backlog (EAGAIN) does not
    // make us wait.
    probe.set_nonblocking(true)?;
    let in_use = || {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is the hand-off socket of a running process",
                path.display()
            ),
        )
    };
    match probe.connect(&SockAddr::unix(path)?) {
        Ok(()) => Err(in_use()),
        Err(e) => match e.raw_os_error() {
            Some(nix::libc::ECONNREFUSED) | Some(nix::libc::ENOENT) => Ok(()),
            // Backlog full, or a listener of another socket type: alive.
            Some(nix::libc::EAGAIN) | Some(nix::libc::EPROTOTYPE) => Err(in_use()),
            _ => Err(e),
        },
    }
}

/// Our uid or root: who may talk to us on the hand-off socket.
fn trusted_uid(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

impl HandoffListener {
    /// Binds `path` (0600; the parent directory must exist). A stale socket
    /// file whose owner is gone (connect gives ECONNREFUSED) is replaced; a
    /// live one (someone accepts) is an error of kind AddrInUse: a second
    /// pgferry must not steal the socket of a running one.
    pub fn bind(path: &Path) -> io::Result<Self> {
        in_runtime()?;
        let socket = seqpacket()?;
        let addr = SockAddr::unix(path)?;
        match socket.bind(&addr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                probe_stale(path)?;
                match std::fs::remove_file(path) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "replacing a stale hand-off socket file")
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                socket.bind(&addr)?;
            }
            Err(e) => return Err(e),
        }
        let meta = std::fs::symlink_metadata(path)?;
        // From here on the file is ours: any error below removes it.
        let file = BoundFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        // Before listen(): until then every connect is refused, so there is
        // no window in which the umask's mode lets others in.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        socket.listen(LISTEN_BACKLOG)?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            _file: file,
            fd: register(socket, Interest::READABLE)?,
        })
    }

    /// Next peer whose SO_PEERCRED uid is ours or root (others are closed
    /// and logged, then we go on accepting). Returns the channel and the
    /// peer's pid.
    pub async fn accept(&self) -> io::Result<(Channel, i32)> {
        loop {
            let mut guard = self.fd.readable().await?;
            let socket = match guard.try_io(|s| s.get_ref().accept()) {
                Ok(Ok((socket, _))) => socket,
                // The peer gave up before we accepted it: nothing to do.
                Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::ECONNABORTED) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            };
            drop(guard);
            let creds = match getsockopt(&socket, sockopt::PeerCredentials) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "hand-off peer without credentials: closed");
                    continue;
                }
            };
            if !trusted_uid(creds.uid()) {
                tracing::warn!(
                    uid = creds.uid(),
                    pid = creds.pid(),
                    "hand-off peer of another user: closed"
                );
                continue;
            }
            return Ok((Channel::from_socket(socket)?, creds.pid()));
        }
    }
}

/// One end of a hand-off connection. `&self` methods: one task may send
/// while another receives.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
    /// Receive buffer, reused: a frame may be `MAX_FRAME` long. Locked only
    /// inside one non-blocking `recvmsg`, never across an await.
    buf: Mutex<Vec<u8>>,
}

impl Channel {
    fn from_socket(socket: Socket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        size_buffers(&socket);
        Ok(Self {
            fd: register(
                OwnedFd::from(socket),
                Interest::READABLE | Interest::WRITABLE,
            )?,
            buf: Mutex::new(vec![0; MAX_FRAME]),
        })
    }

    /// Connects to the hand-off socket at `path`. The peer must run as our
    /// uid or root (else PermissionDenied): it is about to hand us sockets.
    pub async fn connect(path: &Path) -> io::Result<(Channel, i32)> {
        in_runtime()?;
        let addr = SockAddr::unix(path)?;
        // A Unix connect blocks only while the listener's backlog is full;
        // non-blocking it would give EAGAIN with nothing to wait on.
        let socket = tokio::task::spawn_blocking(move || {
            let socket = seqpacket()?;
            // Before connect: the kernel sizes the message limit from it.
            size_buffers(&socket);
            socket.connect(&addr)?;
            Ok::<_, io::Error>(socket)
        })
        .await
        .map_err(io::Error::other)??;
        let creds = getsockopt(&socket, sockopt::PeerCredentials)?;
        if !trusted_uid(creds.uid()) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "hand-off socket {} is held by uid {} (pid {}), not by us",
                    path.display(),
                    creds.uid(),
                    creds.pid()
                ),
            ));
        }
        Ok((Self::from_socket(socket)?, creds.pid()))
    }

    /// One frame (at most MAX_FRAME bytes, else InvalidInput) with up to
    /// MAX_FDS fds attached. The fds stay open here: the kernel passes
    /// copies.
    pub async fn send(&self, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if frame.is_empty() {
            // A zero-length seqpacket read is how EOF looks.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty hand-off frame",
            ));
        }
        if frame.len() > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "hand-off frame of {} bytes (at most {MAX_FRAME})",
                    frame.len()
                ),
            ));
        }
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} fds on one hand-off frame (at most {MAX_FDS})",
                    fds.len()
                ),
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        let iov = [io::IoSlice::new(frame)];
        loop {
            let mut guard = self.fd.writable().await?;
            let sent = guard.try_io(|fd| {
                // MSG_NOSIGNAL: a gone peer is EPIPE here, not SIGPIPE.
                sendmsg::<UnixAddr>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            });
            match sent {
                // Seqpacket sends are atomic: all or an error.
                Ok(Ok(n)) if n == frame.len() => return Ok(()),
                Ok(Ok(n)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("hand-off frame sent short ({n} of {})", frame.len()),
                    ))
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next frame and its fds (received with MSG_CMSG_CLOEXEC and
    /// wrapped in OwnedFd at once); Ok(None) at EOF. A truncated frame or
    /// control data, or more than MAX_FDS fds, is InvalidData, and every fd
    /// that did arrive is closed.
    pub async fn recv(&self) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        self.recv_with(SCM_MAX_FD).await
    }

    /// `recv` with room for `fd_room` fds in the control buffer (tests use
    /// a small one to provoke MSG_CTRUNC).
    async fn recv_with(&self, fd_room: usize) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| self.recv_once(fd.as_raw_fd(), fd_room)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    fn recv_once(&self, fd: RawFd, fd_room: usize) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        // Zeroed: after MSG_CTRUNC we walk it by hand, and a zero header
        // ends the walk.
        let mut cmsg =
            vec![0u8; nix::sys::socket::cmsg_space::<RawFd>().saturating_mul(fd_room.max(1))];
        let mut iov = [io::IoSliceMut::new(&mut buf[..])];
        let (bytes, flags, fds) = {
            let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
            let fds = match msg.cmsgs() {
                Ok(iter) => {
                    let mut fds = Vec::new();
                    for c in iter {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel just installed these fds
                            // in this process; nothing else owns them.
                            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                        }
                    }
                    Some(fds)
                }
                // MSG_CTRUNC: nix hands out nothing; collected below.
                Err(_) => None,
            };
            (msg.bytes, msg.flags, fds)
        };
        let fds = match fds {
            Some(fds) => fds,
            None => fds_from_truncated(&mut cmsg),
        };
        if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
            // `fds` is dropped: whatever arrived is closed.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "hand-off message truncated ({}{})",
                    if flags.contains(MsgFlags::MSG_TRUNC) {
                        "frame over MAX_FRAME"
                    } else {
                        ""
                    },
                    if flags.contains(MsgFlags::MSG_CTRUNC) {
                        " control data: fds lost"
                    } else {
                        ""
                    },
                ),
            ));
        }
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} fds on one hand-off frame (at most {MAX_FDS})",
                    fds.len()
                ),
            ));
        }
        if bytes == 0 {
            if fds.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "empty hand-off frame with fds",
            ));
        }
        Ok(Some((buf[..bytes].to_vec(), fds)))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// The fds the kernel installed before it ran out of control buffer
/// (`MSG_CTRUNC`), which nix's `cmsgs()` refuses to hand out: taken into
/// OwnedFd so they are closed, not leaked.
fn fds_from_truncated(cmsg: &mut [u8]) -> Vec<OwnedFd> {
    use nix::libc;
    let mut fds = Vec::new();
    if cmsg.is_empty() {
        return fds;
    }
    // SAFETY: a msghdr describing only our control buffer, walked with
    // libc's own macros, which stay inside msg_control..+msg_controllen.
    // The kernel wrote whole headers for what it installed; the rest of
    // the buffer is still zero, and a zero length ends the walk.
    unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_control = cmsg.as_mut_ptr().cast();
        mh.msg_controllen = cmsg.len() as _;
        let end = cmsg.as_ptr() as usize + cmsg.len();
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            let len = (*c).cmsg_len as usize;
            let header = libc::CMSG_LEN(0) as usize;
            if len < header {
                break;
            }
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let room = end.saturating_sub(data as usize);
                let n = ((len - header) / std::mem::size_of::<RawFd>())
                    .min(room / std::mem::size_of::<RawFd>());
                for i in 0..n {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    if raw >= 0 {
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    async fn pair(dir: &Path) -> (HandoffListener, Channel, Channel) {
        let path = dir.join("handoff.sock");
        let listener = HandoffListener::bind(&path).unwrap();
        let (connected, accepted) = tokio::join!(Channel::connect(&path), listener.accept());
        let (new_end, old_pid) = connected.unwrap();
        let (old_end, new_pid) = accepted.unwrap();
        assert_eq!(old_pid, std::process::id() as i32);
        assert_eq!(new_pid, std::process::id() as i32);
        (listener, old_end, new_end)
    }

    /// Writes through `passed` (received over the channel) and reads at
    /// `other`, the far end of the original pair.
    fn works(passed: OwnedFd, other: &mut UnixStream, tag: &[u8]) {
        let mut s = UnixStream::from(passed);
        s.write_all(tag).unwrap();
        let mut got = vec![0; tag.len()];
        other.read_exact(&mut got).unwrap();
        assert_eq!(got, tag);
    }

    #[tokio::test]
    async fn frames_with_zero_one_two_fds_round_trip_and_the_fds_work() {
        let dir = tempfile::tempdir().unwrap();
        let (_l, old, new) = pair(dir.path()).await;

        old.send(b"\x01hello", &[]).await.unwrap();
        let (frame, fds) = new.recv().await.unwrap().unwrap();
        assert_eq!((frame.as_slice(), fds.len()), (&b"\x01hello"[..], 0));

        let (a, mut a_far) = UnixStream::pair().unwrap();
        old.send(b"one", &[a.as_fd()]).await.unwrap();
        drop(a); // the copy in flight keeps the socket alive
        let (frame, mut fds) = new.recv().await.unwrap().unwrap();
        assert_eq!((frame.as_slice(), fds.len()), (&b"one"[..], 1));
        let flags = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert!(
            nix::fcntl::FdFlag::from_bits_truncate(flags).contains(nix::fcntl::FdFlag::FD_CLOEXEC),
            "received with MSG_CMSG_CLOEXEC"
        );
        works(fds.remove(0), &mut a_far, b"through one");

        // Both directions, and a TCP socket among the fds.
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let (mut server, _) = tcp.accept().unwrap();
        let (b, mut b_far) = UnixStream::pair().unwrap();
        new.send(b"two", &[client.as_fd(), b.as_fd()])
            .await
            .unwrap();
        drop((client, b));
        let (frame, mut fds) = old.recv().await.unwrap().unwrap();
        assert_eq!((frame.as_slice(), fds.len()), (&b"two"[..], 2));
        let b_passed = fds.pop().unwrap();
        let mut c = std::net::TcpStream::from(fds.pop().unwrap());
        c.write_all(b"tcp").unwrap();
        let mut got = [0; 3];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"tcp");
        works(b_passed, &mut b_far, b"through two");
    }

    #[tokio::test]
    async fn eof_after_the_peer_drops() {
        let dir = tempfile::tempdir().unwrap();
        let (_l, old, new) = pair(dir.path()).await;
        old.send(b"last", &[]).await.unwrap();
        drop(old);
        let (frame, _) = new.recv().await.unwrap().unwrap();
        assert_eq!(frame, b"last", "queued frames survive the sender");
        assert!(new.recv().await.unwrap().is_none());
        assert!(new.recv().await.unwrap().is_none(), "EOF stays EOF");
        let err = new.send(b"x", &[]).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::EPIPE));
    }

    #[tokio::test]
    async fn limits_are_enforced_on_send() {
        let dir = tempfile::tempdir().unwrap();
        let (_l, old, new) = pair(dir.path()).await;
        let big = vec![7u8; MAX_FRAME + 1];
        let err = old.send(&big, &[]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            old.send(b"", &[]).await.unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let (a, _a_far) = UnixStream::pair().unwrap();
        let many: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
        assert_eq!(
            old.send(b"x", &many).await.unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // Exactly MAX_FRAME fits (the socket buffers were sized for it).
        let full = vec![9u8; MAX_FRAME];
        old.send(&full, &many[..MAX_FDS]).await.unwrap();
        let (frame, fds) = new.recv().await.unwrap().unwrap();
        assert_eq!((frame.len(), fds.len()), (MAX_FRAME, MAX_FDS));
        assert!(frame.iter().all(|b| *b == 9));
    }

    #[tokio::test]
    async fn truncated_control_data_is_an_error_and_closes_what_arrived() {
        let dir = tempfile::tempdir().unwrap();
        let (_l, old, new) = pair(dir.path()).await;
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..3).map(|_| UnixStream::pair().unwrap()).collect();
        let fds: Vec<BorrowedFd<'_>> = pairs.iter().map(|(a, _)| a.as_fd()).collect();
        old.send(b"three", &fds).await.unwrap();
        let (ours, mut fars): (Vec<UnixStream>, Vec<UnixStream>) = pairs.into_iter().unzip();
        drop(ours);
        // Room for one fd: the kernel installs one and drops the rest.
        let err = new.recv_with(1).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        for far in &mut fars {
            far.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1];
            assert_eq!(far.read(&mut b).unwrap(), 0, "no copy of the fd leaked");
        }
    }

    #[tokio::test]
    async fn too_many_fds_from_the_peer_are_closed() {
        // A peer not using Channel::send may attach more than MAX_FDS.
        let dir = tempfile::tempdir().unwrap();
        let (_l, old, new) = pair(dir.path()).await;
        let pairs: Vec<(UnixStream, UnixStream)> = (0..MAX_FDS + 1)
            .map(|_| UnixStream::pair().unwrap())
            .collect();
        let raw: Vec<RawFd> = pairs.iter().map(|(a, _)| a.as_raw_fd()).collect();
        sendmsg::<UnixAddr>(
            old.as_fd().as_raw_fd(),
            &[io::IoSlice::new(b"x")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let (ours, mut fars): (Vec<UnixStream>, Vec<UnixStream>) = pairs.into_iter().unzip();
        drop(ours);
        let err = new.recv().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        for far in &mut fars {
            far.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1];
            assert_eq!(far.read(&mut b).unwrap(), 0);
        }
    }

    #[tokio::test]
    async fn a_live_socket_is_not_stolen_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let first = HandoffListener::bind(&path).unwrap();
        let err = HandoffListener::bind(&path).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(path.exists(), "the refused bind left the file alone");

        // Stale: a bound socket whose owner closed it without removing
        // the file (as after a crash).
        drop(first);
        assert!(!path.exists(), "drop removed our own file");
        let crashed = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(crashed);
        assert!(path.exists());
        let second = HandoffListener::bind(&path).unwrap();
        let (c, _) = tokio::join!(Channel::connect(&path), second.accept());
        c.unwrap();

        // A file that is not a socket is never deleted.
        drop(second);
        std::fs::write(&path, b"keep me").unwrap();
        let err = HandoffListener::bind(&path).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[tokio::test]
    async fn drop_leaves_a_newer_processes_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let old = HandoffListener::bind(&path).unwrap();
        // Someone removed it and bound their own (a newer pgferry after
        // the hand-off, say).
        std::fs::remove_file(&path).unwrap();
        let newer = HandoffListener::bind(&path).unwrap();
        drop(old);
        assert!(path.exists(), "not our inode: kept");
        drop(newer);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn socket_file_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        let _l = HandoffListener::bind(&path).unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_frames_to_a_slow_receiver_arrive_all_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (_l, old, new) = pair(dir.path()).await;
        const N: u32 = 400;
        let sender = tokio::spawn(async move {
            let (a, _a_far) = UnixStream::pair().unwrap();
            for i in 0..N {
                // Some frames large, so the send buffer fills as well as
                // the receiver's queue.
                let len = if i % 7 == 0 { 60_000 } else { 16 };
                let mut frame = vec![(i % 251) as u8; len];
                frame[..4].copy_from_slice(&i.to_be_bytes());
                let fds = if i % 3 == 0 { vec![a.as_fd()] } else { vec![] };
                old.send(&frame, &fds).await.unwrap();
            }
            old
        });
        for i in 0..N {
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (frame, fds) = new.recv().await.unwrap().unwrap();
            assert_eq!(u32::from_be_bytes(frame[..4].try_into().unwrap()), i);
            let len = if i % 7 == 0 { 60_000 } else { 16 };
            assert_eq!(frame.len(), len);
            assert!(frame[4..].iter().all(|b| *b == (i % 251) as u8));
            assert_eq!(fds.len(), usize::from(i % 3 == 0));
        }
        let old = sender.await.unwrap();
        drop(old);
        assert!(new.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn send_and_recv_run_concurrently_on_one_channel() {
        let dir = tempfile::tempdir().unwrap();
        let (_l, old, new) = pair(dir.path()).await;
        let old = std::sync::Arc::new(old);
        let reader = {
            let old = old.clone();
            tokio::spawn(async move { old.recv().await.unwrap().unwrap().0 })
        };
        tokio::task::yield_now().await;
        old.send(b"ping", &[]).await.unwrap();
        assert_eq!(new.recv().await.unwrap().unwrap().0, b"ping");
        new.send(b"pong", &[]).await.unwrap();
        assert_eq!(reader.await.unwrap(), b"pong");
    }
}
