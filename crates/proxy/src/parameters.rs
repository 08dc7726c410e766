//! The server parameters a client has been told (ParameterStatus), kept
//! for as long as its session lives.
//!
//! Every idle session holds one of these, so it is one allocation: names
//! and values end to end, each followed by a NUL (the protocol's C strings
//! cannot contain one). A list of `(String, String)` pairs costed about 28
//! small allocations, over 1 KiB per session with the allocator's overhead.
//! Changes are rare (a `SET` of a reported setting), so they rebuild it.

/// ParameterStatus name/value pairs, in the order first reported.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ParameterList {
    /// `name\0value\0name\0value\0...`
    packed: Box<str>,
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
            packed: packed.into_boxed_str(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let mut parts = self.packed.split_terminator('\0');
        std::iter::from_fn(move || Some((parts.next()?, parts.next()?)))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    pub fn contains(&self, name: &str, value: &str) -> bool {
        self.get(name) == Some(value)
    }

    pub fn is_empty(&self) -> bool {
        self.packed.is_empty()
    }

    /// Sets `name` to `value`, appending it when new.
    pub fn set(&mut self, name: &str, value: &str) {
        if self.contains(name, value) || name.contains('\0') || value.contains('\0') {
            return;
        }
        let mut packed = String::with_capacity(self.packed.len() + value.len() + name.len() + 2);
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
        self.packed = packed.into_boxed_str();
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
}
