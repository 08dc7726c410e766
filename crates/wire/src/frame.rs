//! Message framing over a byte stream, without copying or decoding.
//!
//! After startup every PostgreSQL message is `tag: u8, len: u32 (includes
//! itself), body: len - 4 bytes`. The forwarder moves raw bytes; this scanner
//! walks them as they pass and reports where messages start and end, keeping
//! the state of a header or body that is split across reads. It never
//! buffers a message: a header is at most 5 bytes and is the only thing
//! it copies.

use thiserror::Error;

/// PostgreSQL's own limit for a single message (1 GiB - 1).
pub const DEFAULT_MAX_MESSAGE_LEN: u32 = 0x3fff_ffff;

/// Header size: one tag byte and a four-byte length.
pub const HEADER_LEN: usize = 5;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is smaller than the length field itself.
    #[error("invalid message length {len} for message type {tag:?}", tag = *tag as char)]
    InvalidLength { tag: u8, len: u32 },
    /// The length field exceeds the configured maximum.
    #[error("message of type {tag:?} is {len} bytes, over the {max}-byte limit", tag = *tag as char)]
    TooLong { tag: u8, len: u32, max: u32 },
}

/// What a [`FrameVisitor`] tells the scanner after a message has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop right after this message; the rest of the input is left unconsumed.
    Pause,
}

/// Receives message events from [`FrameScanner::scan`].
pub trait FrameVisitor {
    /// A header is complete. `len` includes the 4-byte length field.
    /// Return `true` to receive the body through [`FrameVisitor::body`].
    fn start(&mut self, tag: u8, len: u32) -> bool;
    /// A piece of a body the visitor asked for; pieces arrive in order.
    fn body(&mut self, _tag: u8, _chunk: &[u8]) {}
    /// The last byte of a message has passed.
    fn end(&mut self, tag: u8) -> Flow;
}

/// What one [`FrameScanner::scan`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Bytes consumed: all of the input unless the visitor paused.
    pub consumed: usize,
    /// The visitor paused after a message that ended at `consumed`.
    pub paused: bool,
}

/// Walks message boundaries over a stream delivered in arbitrary pieces.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    max_len: u32,
    header: [u8; HEADER_LEN],
    header_have: u8,
    body_left: u32,
    tag: u8,
    capture: bool,
}

impl FrameScanner {
    pub fn new(max_len: u32) -> Self {
        Self {
            max_len,
            header: [0; HEADER_LEN],
            header_have: 0,
            body_left: 0,
            tag: 0,
            capture: false,
        }
    }

    /// True between messages: no header byte or body byte is pending.
    pub fn at_boundary(&self) -> bool {
        self.header_have == 0 && self.body_left == 0
    }

    /// The tag of the message in progress, if one is.
    pub fn current_tag(&self) -> Option<u8> {
        if self.body_left > 0 || self.header_have > 0 {
            Some(if self.header_have > 0 {
                self.header[0]
            } else {
                self.tag
            })
        } else {
            None
        }
    }

    /// Scans `data`, reporting events to `visitor`, until its end or until
    /// the visitor pauses.
    pub fn scan<V: FrameVisitor>(
        &mut self,
        data: &[u8],
        visitor: &mut V,
    ) -> Result<Scan, FrameError> {
        let done = |consumed, paused| Ok(Scan { consumed, paused });
        let mut pos = 0;
        while pos < data.len() {
            if self.body_left > 0 {
                let take = (self.body_left as usize).min(data.len() - pos);
                if self.capture {
                    visitor.body(self.tag, &data[pos..pos + take]);
                }
                pos += take;
                // `take` <= body_left, which is a u32.
                self.body_left -= take as u32;
                if self.body_left == 0 && visitor.end(self.tag) == Flow::Pause {
                    return done(pos, true);
                }
                continue;
            }
            // Header: parse in place when whole, else collect across reads.
            let (tag, len) = if self.header_have == 0 && data.len() - pos >= HEADER_LEN {
                let h = &data[pos..pos + HEADER_LEN];
                pos += HEADER_LEN;
                (h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]))
            } else {
                let need = HEADER_LEN - self.header_have as usize;
                let take = need.min(data.len() - pos);
                let have = self.header_have as usize;
                self.header[have..have + take].copy_from_slice(&data[pos..pos + take]);
                pos += take;
                self.header_have += take as u8;
                if (self.header_have as usize) < HEADER_LEN {
                    return done(pos, false);
                }
                self.header_have = 0;
                let h = self.header;
                (h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]))
            };
            if len < 4 {
                return Err(FrameError::InvalidLength { tag, len });
            }
            if len > self.max_len {
                return Err(FrameError::TooLong {
                    tag,
                    len,
                    max: self.max_len,
                });
            }
            self.tag = tag;
            self.capture = visitor.start(tag, len);
            self.body_left = len - 4;
            if self.body_left == 0 && visitor.end(tag) == Flow::Pause {
                return done(pos, true);
            }
        }
        done(pos, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        events: Vec<(u8, u32, Vec<u8>)>,
        capture_tags: Vec<u8>,
        pause_on: Option<u8>,
        open: Option<(u8, u32, Vec<u8>)>,
    }

    impl FrameVisitor for Recorder {
        fn start(&mut self, tag: u8, len: u32) -> bool {
            assert!(self.open.is_none(), "start while a message is open");
            self.open = Some((tag, len, Vec::new()));
            self.capture_tags.contains(&tag)
        }
        fn body(&mut self, tag: u8, chunk: &[u8]) {
            let open = self.open.as_mut().expect("body without start");
            assert_eq!(open.0, tag);
            open.2.extend_from_slice(chunk);
        }
        fn end(&mut self, tag: u8) -> Flow {
            let open = self.open.take().expect("end without start");
            assert_eq!(open.0, tag);
            self.events.push(open);
            if self.pause_on == Some(tag) {
                Flow::Pause
            } else {
                Flow::Continue
            }
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(msg(b'T', b"rowdesc"));
        s.extend(msg(b'D', &[7u8; 300]));
        s.extend(msg(b'C', b"SELECT 1\0"));
        s.extend(msg(b'Z', b"I"));
        s.extend(msg(b'S', b""));
        s
    }

    #[test]
    fn every_split_gives_same_events() {
        let s = stream();
        let mut whole = Recorder {
            capture_tags: vec![b'Z', b'C'],
            ..Default::default()
        };
        let mut sc = FrameScanner::new(DEFAULT_MAX_MESSAGE_LEN);
        assert_eq!(sc.scan(&s, &mut whole).unwrap().consumed, s.len());
        assert_eq!(whole.events.len(), 5);
        assert_eq!(whole.events[3], (b'Z', 5, b"I".to_vec()));
        assert_eq!(whole.events[2].2, b"SELECT 1\0".to_vec());
        assert!(whole.events[1].2.is_empty(), "uncaptured body delivered");
        // Byte at a time and every two-piece split.
        let mut bytewise = Recorder {
            capture_tags: vec![b'Z', b'C'],
            ..Default::default()
        };
        let mut sc = FrameScanner::new(DEFAULT_MAX_MESSAGE_LEN);
        for b in &s {
            assert!(sc.current_tag().is_some() || sc.at_boundary());
            assert_eq!(
                sc.scan(std::slice::from_ref(b), &mut bytewise)
                    .unwrap()
                    .consumed,
                1
            );
        }
        assert!(sc.at_boundary());
        assert_eq!(bytewise.events, whole.events);
        for cut in 0..=s.len() {
            let mut r = Recorder {
                capture_tags: vec![b'Z', b'C'],
                ..Default::default()
            };
            let mut sc = FrameScanner::new(DEFAULT_MAX_MESSAGE_LEN);
            sc.scan(&s[..cut], &mut r).unwrap();
            sc.scan(&s[cut..], &mut r).unwrap();
            assert_eq!(r.events, whole.events, "split at {cut}");
        }
    }

    #[test]
    fn pause_stops_right_after_message() {
        let s = stream();
        let mut r = Recorder {
            pause_on: Some(b'C'),
            ..Default::default()
        };
        let mut sc = FrameScanner::new(DEFAULT_MAX_MESSAGE_LEN);
        let scan = sc.scan(&s, &mut r).unwrap();
        let used = scan.consumed;
        let expected = msg(b'T', b"rowdesc").len() + msg(b'D', &[7u8; 300]).len() + 14;
        assert_eq!(used, expected);
        assert!(scan.paused);
        assert!(sc.at_boundary());
        r.pause_on = None;
        let rest = sc.scan(&s[used..], &mut r).unwrap();
        assert_eq!(
            rest,
            Scan {
                consumed: s.len() - used,
                paused: false
            }
        );
        assert_eq!(r.events.len(), 5);
    }

    #[test]
    fn empty_body_message_pauses() {
        let s = [msg(b'S', b""), msg(b'Q', b"x\0")].concat();
        let mut r = Recorder {
            pause_on: Some(b'S'),
            ..Default::default()
        };
        let mut sc = FrameScanner::new(DEFAULT_MAX_MESSAGE_LEN);
        assert_eq!(
            sc.scan(&s, &mut r).unwrap(),
            Scan {
                consumed: 5,
                paused: true
            }
        );
        // A pause on the very last byte of the input is still reported.
        let mut sc = FrameScanner::new(DEFAULT_MAX_MESSAGE_LEN);
        assert_eq!(
            sc.scan(&s[..5], &mut r).unwrap(),
            Scan {
                consumed: 5,
                paused: true
            }
        );
    }

    #[test]
    fn lengths_are_checked() {
        let mut r = Recorder::default();
        let mut sc = FrameScanner::new(1000);
        assert_eq!(
            sc.scan(&[b'Q', 0, 0, 0, 3], &mut r),
            Err(FrameError::InvalidLength { tag: b'Q', len: 3 })
        );
        let mut sc = FrameScanner::new(1000);
        assert_eq!(
            sc.scan(&[b'Q', 0, 0, 3, 233], &mut r),
            Err(FrameError::TooLong {
                tag: b'Q',
                len: 1001,
                max: 1000
            })
        );
        // Split header still checked.
        let mut sc = FrameScanner::new(1000);
        assert_eq!(sc.scan(&[b'Q', 0x7f], &mut r).map(|s| s.consumed), Ok(2));
        assert!(!sc.at_boundary());
        assert_eq!(sc.current_tag(), Some(b'Q'));
        assert!(matches!(
            sc.scan(&[0xff, 0xff, 0xff], &mut r),
            Err(FrameError::TooLong { .. })
        ));
    }
}
