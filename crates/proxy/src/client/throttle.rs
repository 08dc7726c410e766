//! Back-off per (client IP, user) after failed authentications, as CockroachDB's sqlproxy does:
//! after a failure, attempts from that pair are refused until the back-off has passed (1 s,
//! doubling up to a cap); a success forgets the pair. A refused attempt gets the wrong-password
//! answer at once, before any exchange: cheap for the proxy, and the same for known and unknown
//! users, so the throttle tells nothing about which users exist.
//!
//! Attempts running side by side: each takes a ticket naming the pair's state when it started.
//! A failure only extends the back-off if no other failure came since that ticket (a burst of
//! parallel guesses counts once), and a success after such a failure is refused as well (before
//! the server signature, which would confirm the password), so parallel guesses gain nothing.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

#[derive(Clone, Debug)]
pub struct ThrottleSettings {
    pub enabled: bool,
    pub initial: Duration,
    pub max: Duration,
    pub max_entries: usize,
}

/// The attempt is refused; the back-off ends after `retry_in` (for logs only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttled {
    pub retry_in: Duration,
}

/// The pair's state when an attempt was admitted; hand it back with the verdict.
#[derive(Debug)]
pub struct Ticket {
    key: Key,
    /// 0: the pair had no entry.
    generation: u64,
}

/// User names are hashed so that an entry's size does not depend on what a client sends.
type Key = (IpAddr, [u8; 32]);

struct Entry {
    /// Attempts before this are refused.
    until: Instant,
    /// Back-off after the next failure.
    next_backoff: Duration,
    generation: u64,
    /// Key in `Table::by_expiry`.
    expiry: (Instant, u64),
}

#[derive(Default)]
struct Table {
    entries: HashMap<Key, Entry>,
    /// Entries by when they may be forgotten: expired ones are purged from the front, and when
    /// the table is full the front one (the oldest, least throttled) is evicted.
    by_expiry: BTreeMap<(Instant, u64), Key>,
    /// Source of generations and expiry tie-breakers; never 0.
    seq: u64,
}

pub struct AuthThrottle {
    settings: ThrottleSettings,
    table: Mutex<Table>,
    throttled: prometheus::IntCounter,
}

impl AuthThrottle {
    pub fn new(settings: ThrottleSettings, throttled: prometheus::IntCounter) -> Self {
        Self {
            settings,
            table: Mutex::default(),
            throttled,
        }
    }

    /// Called before the exchange.
    pub fn admit(&self, ip: IpAddr, user: &str) -> Result<Ticket, Throttled> {
        self.admit_at(ip, user, Instant::now())
    }

    /// The attempt failed (wrong password or unknown user).
    pub fn failed(&self, ticket: Ticket) {
        self.failed_at(ticket, Instant::now())
    }

    /// The proof was right; `Err` if the attempt must be refused anyway.
    pub fn succeeded(&self, ticket: Ticket) -> Result<(), Throttled> {
        self.succeeded_at(ticket, Instant::now())
    }

    /// (IP, user) pairs remembered now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn key(ip: IpAddr, user: &str) -> Key {
        // An IPv4 client seen through an IPv6 socket is the same client.
        (ip.to_canonical(), Sha256::digest(user.as_bytes()).into())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every change leaves the table consistent before anything can panic.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit_at(&self, ip: IpAddr, user: &str, now: Instant) -> Result<Ticket, Throttled> {
        let key = Self::key(ip, user);
        if !self.settings.enabled {
            return Ok(Ticket { key, generation: 0 });
        }
        let mut t = self.lock();
        t.purge(now);
        let generation = match t.entries.get(&key) {
            Some(e) if now < e.until => {
                self.throttled.inc();
                return Err(Throttled {
                    retry_in: e.until - now,
                });
            }
            Some(e) => e.generation,
            None => 0,
        };
        Ok(Ticket { key, generation })
    }

    fn failed_at(&self, ticket: Ticket, now: Instant) {
        if !self.settings.enabled {
            return;
        }
        let mut t = self.lock();
        t.purge(now);
        let current = t.entries.get(&ticket.key).map_or(0, |e| e.generation);
        if current != ticket.generation {
            // Another attempt of this burst failed first and already set the back-off.
            return;
        }
        let (backoff, old_expiry) = match t.entries.get(&ticket.key) {
            Some(e) => (e.next_backoff, Some(e.expiry)),
            None => (self.settings.initial, None),
        };
        if let Some(old) = old_expiry {
            t.by_expiry.remove(&old);
        } else {
            while t.entries.len() >= self.settings.max_entries {
                if !t.evict_first() {
                    break;
                }
            }
        }
        t.seq += 1;
        let seq = t.seq;
        let until = now + backoff;
        // Forgotten only after a quiet spell as long as the cap, so waiting out each back-off
        // does not reset it.
        let expiry = (until + self.settings.max, seq);
        t.by_expiry.insert(expiry, ticket.key);
        t.entries.insert(
            ticket.key,
            Entry {
                until,
                next_backoff: (backoff * 2).min(self.settings.max),
                generation: seq,
                expiry,
            },
        );
    }

    fn succeeded_at(&self, ticket: Ticket, now: Instant) -> Result<(), Throttled> {
        if !self.settings.enabled {
            return Ok(());
        }
        let mut t = self.lock();
        match t.entries.get(&ticket.key) {
            None if ticket.generation == 0 => Ok(()),
            Some(e) if e.generation == ticket.generation => {
                let expiry = e.expiry;
                t.by_expiry.remove(&expiry);
                t.entries.remove(&ticket.key);
                Ok(())
            }
            // A failure from this pair came while this attempt ran.
            other => {
                self.throttled.inc();
                Err(Throttled {
                    retry_in: other
                        .map_or(Duration::ZERO, |e| e.until.saturating_duration_since(now)),
                })
            }
        }
    }
}

impl Table {
    fn purge(&mut self, now: Instant) {
        while self
            .by_expiry
            .first_key_value()
            .is_some_and(|((at, _), _)| *at <= now)
        {
            self.evict_first();
        }
    }

    fn evict_first(&mut self) -> bool {
        match self.by_expiry.pop_first() {
            Some((_, key)) => {
                self.entries.remove(&key);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const OTHER_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    fn throttle(max_entries: usize) -> AuthThrottle {
        AuthThrottle::new(
            ThrottleSettings {
                enabled: true,
                initial: Duration::from_secs(1),
                max: Duration::from_secs(8),
                max_entries,
            },
            prometheus::IntCounter::new("t", "t").unwrap(),
        )
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn back_off_doubles_up_to_the_cap_and_success_resets_it() {
        let th = throttle(100);
        let t0 = Instant::now();
        let mut now = t0;
        for expected in [1.0, 2.0, 4.0, 8.0, 8.0] {
            let ticket = th.admit_at(IP, "u", now).unwrap();
            th.failed_at(ticket, now);
            let refused = th
                .admit_at(IP, "u", now + secs(expected - 0.01))
                .unwrap_err();
            assert_eq!(refused.retry_in, secs(0.01));
            now += secs(expected);
        }
        // Other users and other addresses are not affected.
        assert!(th.admit_at(IP, "v", t0 + secs(0.5)).is_ok());
        assert!(th.admit_at(OTHER_IP, "u", t0 + secs(0.5)).is_ok());
        assert_eq!(th.throttled.get(), 5);
        let ticket = th.admit_at(IP, "u", now).unwrap();
        th.succeeded_at(ticket, now).unwrap();
        assert!(th.is_empty());
        let ticket = th.admit_at(IP, "u", now).unwrap();
        th.failed_at(ticket, now);
        assert!(th.admit_at(IP, "u", now + secs(1.0)).is_ok(), "back to 1 s");
    }

    #[test]
    fn entries_expire_after_a_quiet_spell_as_long_as_the_cap() {
        let th = throttle(100);
        let now = Instant::now();
        let ticket = th.admit_at(IP, "u", now).unwrap();
        th.failed_at(ticket, now);
        assert!(th.admit_at(IP, "u", now + secs(5.0)).is_ok());
        assert_eq!(th.len(), 1);
        // until (1 s) + cap (8 s).
        let ticket = th.admit_at(IP, "u", now + secs(9.0)).unwrap();
        assert!(th.is_empty());
        th.failed_at(ticket, now + secs(9.0));
        assert!(th.admit_at(IP, "u", now + secs(10.0)).is_ok(), "1 s again");
    }

    #[test]
    fn a_parallel_burst_counts_once_and_cannot_confirm_a_password() {
        let th = throttle(100);
        let now = Instant::now();
        let tickets: Vec<_> = (0..3).map(|_| th.admit_at(IP, "u", now).unwrap()).collect();
        let mut it = tickets.into_iter();
        th.failed_at(it.next().unwrap(), now);
        th.failed_at(it.next().unwrap(), now);
        // The right password in the same burst is refused too.
        assert!(th.succeeded_at(it.next().unwrap(), now).is_err());
        // One failure's worth of back-off: 1 s, not 2.
        assert!(th.admit_at(IP, "u", now + secs(1.0)).is_ok());
    }

    #[test]
    fn the_table_is_bounded() {
        let th = throttle(3);
        let now = Instant::now();
        for (i, user) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            let at = now + secs(i as f64 * 0.01);
            let ticket = th.admit_at(IP, user, at).unwrap();
            th.failed_at(ticket, at);
        }
        assert_eq!(th.len(), 3);
        let at = now + secs(0.1);
        // The oldest went first.
        assert!(th.admit_at(IP, "a", at).is_ok());
        assert!(th.admit_at(IP, "b", at).is_ok());
        assert!(th.admit_at(IP, "e", at).is_err());
        let t = th.lock();
        assert_eq!(t.entries.len(), t.by_expiry.len());
    }

    #[test]
    fn disabled_never_refuses() {
        let th = AuthThrottle::new(
            ThrottleSettings {
                enabled: false,
                initial: Duration::from_secs(1),
                max: Duration::from_secs(8),
                max_entries: 10,
            },
            prometheus::IntCounter::new("t", "t").unwrap(),
        );
        let now = Instant::now();
        for _ in 0..3 {
            let ticket = th.admit_at(IP, "u", now).unwrap();
            th.failed_at(ticket, now);
        }
        assert!(th.is_empty());
    }
}
