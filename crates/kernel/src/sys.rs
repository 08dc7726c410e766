//! The bpf(2) commands this crate uses, through `libc::syscall`.
//!
//! `union bpf_attr` is built as a zeroed 128-byte buffer with each field
//! written at its offset from `linux/bpf.h`; the kernel accepts a larger
//! attr as long as the bytes it does not know are zero.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::asm::Insn;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
pub const BPF_PROG_TYPE_SK_SKB: u32 = 14;
pub const BPF_SK_SKB_STREAM_PARSER: u32 = 4;
pub const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
/// `BPF_ANY` for map updates: create or replace.
pub const BPF_ANY: u64 = 0;

#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Default for Attr {
    fn default() -> Self {
        Attr([0; 128])
    }
}

impl Attr {
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(&mut self, off: usize, v: &[u8]) -> &mut Self {
        self.0[off..off + v.len()].copy_from_slice(v);
        self
    }
}

/// Runs one bpf(2) command; the result or errno.
fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialized 128-byte buffer for the whole
    // call; every pointer stored inside it (keys, values, instructions,
    // license, log buffer) is owned by the caller's frame and outlives the
    // call, and the kernel reads/writes at most the sizes given with them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of a file descriptor the kernel just returned.
fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: `fd` was just returned by a successful bpf(2) call that
    // creates a new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    let mut name16 = [0u8; 16];
    let n = name.len().min(15);
    name16[..n].copy_from_slice(&name.as_bytes()[..n]);
    attr.u32(0, map_type)
        .u32(4, key_size)
        .u32(8, value_size)
        .u32(12, max_entries)
        .bytes(28, &name16); // map_name after map_flags, inner_map_fd, numa_node
    owned(bpf(BPF_MAP_CREATE, &mut attr)?)
}

/// Loads a program; on failure the error and the verifier's log.
pub fn prog_load(
    prog_type: u32,
    insns: &[Insn],
    name: &str,
    expected_attach_type: u32,
) -> Result<OwnedFd, (io::Error, String)> {
    let code: Vec<u8> = insns.iter().flat_map(|i| i.encode()).collect();
    let license = b"Dual MIT/GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut name16 = [0u8; 16];
    let n = name.len().min(15);
    name16[..n].copy_from_slice(&name.as_bytes()[..n]);
    let load = |log_level: u32, log: &mut Vec<u8>| {
        let mut attr = Attr::default();
        attr.u32(0, prog_type)
            .u32(4, insns.len() as u32)
            .u64(8, code.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, log_level)
            .u32(28, if log_level > 0 { log.len() as u32 } else { 0 })
            .u64(
                32,
                if log_level > 0 {
                    log.as_mut_ptr() as u64
                } else {
                    0
                },
            )
            .bytes(48, &name16)
            .u32(68, expected_attach_type);
        bpf(BPF_PROG_LOAD, &mut attr)
    };
    match load(0, &mut log) {
        Ok(fd) => owned(fd).map_err(|e| (e, String::new())),
        Err(first) => {
            // Again with the verifier log on, for the error message.
            match load(1, &mut log) {
                Ok(fd) => owned(fd).map_err(|e| (e, String::new())),
                Err(_) => {
                    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                    Err((first, String::from_utf8_lossy(&log[..end]).into_owned()))
                }
            }
        }
    }
}

pub fn prog_attach(target_map: RawFd, prog: RawFd, attach_type: u32) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.u32(0, target_map as u32)
        .u32(4, prog as u32)
        .u32(8, attach_type);
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

pub fn map_update(map: &OwnedFd, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_ptr() as u64)
        .u64(24, flags);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

pub fn map_lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(|_| ())
}

pub fn map_delete(map: &OwnedFd, key: &[u8]) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64);
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(|_| ())
}

/// `SO_COOKIE`: the socket's 64-bit cookie, what
/// `bpf_get_socket_cookie` returns inside the programs.
pub fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are live locals; the kernel writes at most
    // `len` (8) bytes into `cookie`.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(cookie)
    }
}

/// Reads and clears `SO_ERROR` (a stream parser stopped with ESTRPIPE leaves
/// one behind).
pub fn take_socket_error(fd: RawFd) -> io::Result<i32> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as in `socket_cookie`, with a 4-byte int.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(err)
    }
}

/// Bytes ever queued for sending on a TCP socket (data sent once, plus
/// not yet sent): `tcpi_bytes_sent - tcpi_bytes_retrans + tcpi_notsent_bytes`
/// from `TCP_INFO` (kernel >= 4.19). Differences of this figure tell how
/// many bytes went into the socket's send path between two reads, whoever
/// wrote them (userspace or the sockmap's redirect worker).
pub fn tcp_bytes_queued(fd: RawFd) -> io::Result<u64> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is a live 256-byte buffer and `len` says so; the
    // kernel writes at most `len` bytes and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < 216 {
        return Err(io::Error::other("TCP_INFO too short (kernel < 4.19)"));
    }
    let u64_at = |off: usize| u64::from_ne_bytes(info[off..off + 8].try_into().unwrap_or([0; 8]));
    let notsent = u32::from_ne_bytes(info[144..148].try_into().unwrap_or([0; 4]));
    Ok(u64_at(200)
        .wrapping_sub(u64_at(208))
        .wrapping_add(u64::from(notsent)))
}
