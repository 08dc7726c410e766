//! The server parameters a client has been told (ParameterStatus), kept
//! for as long as its session lives.
//!
//! Every idle session holds one of these, so it is one allocation: names
//! and values end to end, each followed by a NUL (the protocol's C strings
//! cannot contain one). A list of `(String, String)` pairs costed about 28
//! small allocations, over 1 KiB per session with the allocator's overhead.
//! Changes are rare (a `SET` of a reported setting), so they rebuild it.
//!
//! And it is shared: sessions of one application on one backend are told
//! the same parameters, so equal lists are one interned `Arc<str>` (a few
//! hundred bytes saved per session; a lookup under a lock when a list is
//! built, at login or on a change, never while forwarding).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// ParameterStatus name/value pairs, in the order first reported.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ParameterList {
    /// `name\0value\0name\0value\0...`, interned (`intern`); `None`: empty.
    packed: Option<Arc<str>>,
}

/// One shared copy of a short string used by many sessions (a backend's
/// name, say). Shares `intern`'s table: a packed list ends with a NUL and a
/// name never holds one, so the two cannot collide.
pub(crate) fn shared_name(name: &str) -> Arc<str> {
    intern(name.to_owned()).unwrap_or_else(|| Arc::from(""))
}

/// The lists in use, by content. Entries whose sessions have all gone are
/// swept when the table has doubled since the last sweep.
struct Interned {
    lists: HashMap<Box<str>, Weak<str>>,
    sweep_at: usize,
}

fn intern(packed: String) -> Option<Arc<str>> {
    if packed.is_empty() {
        return None;
    }
    static TABLE: OnceLock<Mutex<Interned>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        Mutex::new(Interned {
            lists: HashMap::new(),
            sweep_at: 64,
        })
    });
    // Each change is one insert or one sweep: a panic cannot leave it torn.
    let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(live) = t.lists.get(packed.as_str()).and_then(Weak::upgrade) {
        return Some(live);
    }
    if t.lists.len() >= t.sweep_at {
        t.lists.retain(|_, w| w.strong_count() > 0);
        t.sweep_at = (t.lists.len() * 2).max(64);
    }
    let list: Arc<str> = Arc::from(packed.as_str());
    t.lists
        .insert(packed.into_boxed_str(), Arc::downgrade(&list));
    Some(list)
}

impl ParameterList {
    /// Builds one from pairs; a name or value with a NUL is dropped (no
    /// server sends one: they are C strings on the wire).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut packed = String::new();
        for (n, v) in pairs {
            if !n.contains('\0') && !v.contains('\0') {
                push_pair(&mut packed, n, v);
            }
        }
        Self {
            packed: intern(packed),
        }
    }

    fn text(&self) -> &str {
        self.packed.as_deref().unwrap_or_default()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let mut parts = self.text().split_terminator('\0');
        std::iter::from_fn(move || Some((parts.next()?, parts.next()?)))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    pub fn contains(&self, name: &str, value: &str) -> bool {
        self.get(name) == Some(value)
    }

    pub fn is_empty(&self) -> bool {
        self.packed.is_none()
    }

    /// Sets `name` to `value`, appending it when new.
    pub fn set(&mut self, name: &str, value: &str) {
        if self.contains(name, value) || name.contains('\0') || value.contains('\0') {
            return;
        }
        let mut packed = String::with_capacity(self.text().len() + value.len() + name.len() + 2);
        let mut found = false;
        for (n, v) in self.iter() {
            if n == name {
                found = true;
                push_pair(&mut packed, n, value);
            } else {
                push_pair(&mut packed, n, v);
            }
        }
        if !found {
            push_pair(&mut packed, name, value);
        }
        self.packed = intern(packed);
    }
}

fn push_pair(packed: &mut String, name: &str, value: &str) {
    packed.push_str(name);
    packed.push('\0');
    packed.push_str(value);
    packed.push('\0');
}

impl std::fmt::Debug for ParameterList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_updates_in_place() {
        let mut p = ParameterList::from_pairs([("server_version", "15.18"), ("TimeZone", "UTC")]);
        assert_eq!(p.get("TimeZone"), Some("UTC"));
        p.set("TimeZone", "Europe/Paris");
        p.set("application_name", "");
        let all: Vec<_> = p.iter().collect();
        assert_eq!(
            all,
            [
                ("server_version", "15.18"),
                ("TimeZone", "Europe/Paris"),
                ("application_name", "")
            ]
        );
        assert!(p.contains("application_name", ""));
        assert_eq!(p.get("missing"), None);
    }

    #[test]
    fn empty_values_and_nul_bytes() {
        let p = ParameterList::from_pairs([("a", ""), ("b\0", "x"), ("c", "y")]);
        assert_eq!(p.iter().collect::<Vec<_>>(), [("a", ""), ("c", "y")]);
        assert!(ParameterList::default().is_empty());
        assert_eq!(ParameterList::default().iter().count(), 0);
    }

    #[test]
    fn equal_lists_share_one_allocation_until_one_changes() {
        let pairs = [
            ("server_version", "18.1"),
            ("TimeZone", "UTC"),
            ("x_shared", "1"),
        ];
        let a = ParameterList::from_pairs(pairs);
        let mut b = ParameterList::from_pairs(pairs);
        let (pa, pb) = (a.packed.clone().unwrap(), b.packed.clone().unwrap());
        assert!(Arc::ptr_eq(&pa, &pb));
        b.set("TimeZone", "Europe/Paris");
        assert_eq!(a.get("TimeZone"), Some("UTC"));
        assert_eq!(b.get("TimeZone"), Some("Europe/Paris"));
        assert!(!Arc::ptr_eq(&pa, b.packed.as_ref().unwrap()));
        // Setting it back finds the shared list again.
        b.set("TimeZone", "UTC");
        assert!(Arc::ptr_eq(&pa, b.packed.as_ref().unwrap()));
    }
}
