//! Read buffers lent to pumps only while a socket has data.
//!
//! An idle session holds no read buffer: a pump takes one when it is about
//! to read and gives it back when everything it read has been written and
//! the next read would block. Buffers are kept per thread, so taking one is
//! a `Vec::pop` without locks or atomics.

use std::cell::RefCell;

/// Large enough for a typical result batch per syscall; small enough that
/// thousands of busy sessions stay cheap.
pub const BUFFER_SIZE: usize = 16 * 1024;
/// Buffers kept per worker thread; beyond that they are freed.
const MAX_POOLED: usize = 256;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

pub fn take() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice())
}

pub fn give(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < MAX_POOLED {
            p.push(buf);
        }
    });
}

#[cfg(test)]
pub fn pooled() -> usize {
    POOL.with(|p| p.borrow().len())
}
