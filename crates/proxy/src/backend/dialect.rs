//! Which kind of server a backend is: PostgreSQL, or CockroachDB (which
//! speaks the same protocol but serializes a session itself). A move runs
//! the dialect's own capture and replay (`transfer::postgres`,
//! `transfer::cockroach`); everything else is shared.

use serde::Deserialize;

use crate::parameters::ParameterList;

/// The server kind a move is run for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Dialect {
    Postgres = 1,
    Cockroach = 2,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Cockroach => "cockroachdb",
        }
    }

    /// From a login's ParameterStatus values: CockroachDB always reports
    /// `crdb_version` (`statusReportParams`, pkg/sql/pgwire/conn.go);
    /// `server_version` naming it is belt and braces.
    pub fn detect(params: &ParameterList) -> Self {
        let cockroach = params.get("crdb_version").is_some()
            || params
                .get("server_version")
                .is_some_and(|v| v.contains("CockroachDB"));
        if cockroach {
            Self::Cockroach
        } else {
            Self::Postgres
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Postgres),
            2 => Some(Self::Cockroach),
            _ => None,
        }
    }
}

/// `[[backend]] dialect`: fixed, or detected at the first login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DialectSetting {
    #[default]
    Auto,
    Postgres,
    #[serde(rename = "cockroachdb")]
    Cockroach,
}

impl DialectSetting {
    /// The dialect it fixes, if any.
    pub fn fixed(self) -> Option<Dialect> {
        match self {
            Self::Auto => None,
            Self::Postgres => Some(Dialect::Postgres),
            Self::Cockroach => Some(Dialect::Cockroach),
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "postgres" => Ok(Self::Postgres),
            "cockroachdb" => Ok(Self::Cockroach),
            other => Err(format!(
                "dialect must be \"auto\", \"postgres\" or \"cockroachdb\", not {other:?}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crdb_version_means_cockroach() {
        let p = ParameterList::from_pairs([
            ("server_version", "13.0.0"),
            ("crdb_version", "CockroachDB CCL v24.1.0"),
        ]);
        assert_eq!(Dialect::detect(&p), Dialect::Cockroach);
        let p = ParameterList::from_pairs([("server_version", "15.4")]);
        assert_eq!(Dialect::detect(&p), Dialect::Postgres);
    }

    #[test]
    fn settings_parse() {
        assert_eq!(
            DialectSetting::parse("cockroachdb"),
            Ok(DialectSetting::Cockroach)
        );
        assert!(DialectSetting::parse("crdb").is_err());
        let v: DialectSetting =
            toml::from_str::<std::collections::HashMap<String, DialectSetting>>(
                "d = \"cockroachdb\"",
            )
            .map(|m| m["d"])
            .unwrap_or(DialectSetting::Auto);
        assert_eq!(v, DialectSetting::Cockroach);
    }
}
