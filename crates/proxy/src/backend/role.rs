//! Primaries and standbys: a backend's role as its check last saw it, and
//! which roles a session may run on (`target_session_attrs`, as libpq
//! names them).
//!
//! The rules (docs/switchover.md, "Roles and routing"): a backend whose
//! role is not known (no `[backend_admin]`, or not checked yet) counts as
//! a primary, as every backend did before roles existed; a read-write
//! session never lands on a known standby; a read-only one only on a
//! standby.

use pgferry_wire::StartupMessage;

/// A backend's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Unknown = 0,
    Primary = 1,
    Standby = 2,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Unknown, Role::Primary, Role::Standby];

    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Primary,
            2 => Self::Standby,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Primary => "primary",
            Self::Standby => "standby",
        }
    }

    /// From `pg_is_in_recovery()`.
    pub fn from_in_recovery(in_recovery: bool) -> Self {
        if in_recovery {
            Self::Standby
        } else {
            Self::Primary
        }
    }
}

/// Which backends a session may run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    /// Not a standby (the default).
    #[default]
    ReadWrite,
    /// Any backend, primary or standby.
    Any,
    /// Standbys only.
    ReadOnly,
    /// Standbys first, then the others.
    PreferStandby,
}

/// The startup option that asks for a role, given as
/// `options=-c pgferry.target_session_attrs=read-only` (a placeholder
/// setting: PostgreSQL accepts and ignores it, so it is passed on as is).
pub const OPTION_NAME: &str = "pgferry.target_session_attrs";

impl TargetSessionAttrs {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "read-write" | "primary" => Self::ReadWrite,
            "any" => Self::Any,
            "read-only" | "standby" => Self::ReadOnly,
            "prefer-standby" => Self::PreferStandby,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadWrite => "read-write",
            Self::Any => "any",
            Self::ReadOnly => "read-only",
            Self::PreferStandby => "prefer-standby",
        }
    }

    /// What the session asked for: the startup option, else
    /// `prefer-standby` for `[routing] read_only_users`, else read-write.
    /// `Err`: the option's value is not one of the names above.
    pub fn for_session(
        startup: &StartupMessage,
        read_only_users: &[String],
    ) -> Result<Self, String> {
        if let Some(v) = startup.param("options").and_then(option_value) {
            return Self::parse(&v).ok_or_else(|| {
                format!(
                    "invalid value for {OPTION_NAME}: {v:?} (read-write, read-only, \
                     prefer-standby, primary, standby or any)"
                )
            });
        }
        if read_only_users.iter().any(|u| u == startup.user()) {
            return Ok(Self::PreferStandby);
        }
        Ok(Self::ReadWrite)
    }

    /// May a session with these attributes run on a backend in `role`?
    pub fn allows(self, role: Role) -> bool {
        match self {
            Self::ReadWrite => role != Role::Standby,
            Self::ReadOnly => role == Role::Standby,
            Self::Any | Self::PreferStandby => true,
        }
    }
}

/// The value of `pgferry.target_session_attrs` in a startup `options`
/// string (`-c name=value` or `--name=value`, space-separated; `\ ` is a
/// space inside a value, as PostgreSQL reads it). The last one wins.
fn option_value(options: &str) -> Option<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut found = None;
    let mut i = 0;
    while i < words.len() {
        let setting = if words[i] == "-c" {
            i += 1;
            words.get(i).map(String::as_str)
        } else if let Some(rest) = words[i].strip_prefix("--") {
            Some(rest)
        } else {
            words[i].strip_prefix("-c")
        };
        if let Some((name, value)) = setting.and_then(|s| s.split_once('=')) {
            if name.eq_ignore_ascii_case(OPTION_NAME) {
                found = Some(value.to_owned());
            }
        }
        i += 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(user: &str, options: Option<&str>) -> StartupMessage {
        let mut params = vec![("user".to_owned(), user.to_owned())];
        if let Some(o) = options {
            params.push(("options".to_owned(), o.to_owned()));
        }
        StartupMessage {
            minor_version: 0,
            params,
            protocol_options: Vec::new(),
        }
    }

    #[test]
    fn options_and_users() {
        let ro = ["report".to_owned()];
        let t = |u, o| TargetSessionAttrs::for_session(&startup(u, o), &ro);
        assert_eq!(t("app", None), Ok(TargetSessionAttrs::ReadWrite));
        assert_eq!(t("report", None), Ok(TargetSessionAttrs::PreferStandby));
        assert_eq!(
            t("app", Some("-c pgferry.target_session_attrs=read-only")),
            Ok(TargetSessionAttrs::ReadOnly)
        );
        assert_eq!(
            t(
                "report",
                Some("-c search_path=x --pgferry.target_session_attrs=any")
            ),
            Ok(TargetSessionAttrs::Any)
        );
        assert_eq!(
            t("app", Some("-cpgferry.target_session_attrs=standby")),
            Ok(TargetSessionAttrs::ReadOnly)
        );
        assert_eq!(
            t("app", Some("-c work_mem=1MB")),
            Ok(TargetSessionAttrs::ReadWrite)
        );
        assert!(t("app", Some("-c pgferry.target_session_attrs=sometimes")).is_err());
    }

    #[test]
    fn which_roles_each_allows() {
        use Role::*;
        use TargetSessionAttrs as T;
        assert!(T::ReadWrite.allows(Primary) && T::ReadWrite.allows(Unknown));
        assert!(!T::ReadWrite.allows(Standby));
        assert!(T::ReadOnly.allows(Standby) && !T::ReadOnly.allows(Primary));
        assert!(T::Any.allows(Standby) && T::PreferStandby.allows(Primary));
    }
}
