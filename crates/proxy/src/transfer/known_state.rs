//! A session's state as of its last capture or replay, and whether it
//! still holds.
//!
//! An idle PostgreSQL session's state (settings, role, prepared
//! statements, temporary objects, locks, LISTEN) changes only when the
//! client sends something: the server does not change it on its own. So
//! while no client message has passed since the state was captured (or
//! replayed onto a new backend), the next migration can reuse it instead
//! of running the capture query again. Any client message at all, even a
//! lone Sync, makes it unknown. A session whose client has sent nothing
//! since its login has the state a login gives (`login_state`): the first
//! migration of every other session captures.

use super::capture::SessionState;
use crate::forwarder::tracker::Stamp;

/// Captured states bigger than this are not kept: the memory is better
/// spent than a capture round trip saved.
const MAX_KEPT_BYTES: usize = 8 * 1024;

#[derive(Debug)]
pub struct KnownState {
    /// The client's last message when the state was known.
    last_request: Option<Stamp>,
    /// The custom setting names the capture asked for.
    custom: Vec<String>,
    state: SessionState,
}

impl KnownState {
    /// Keeps `state` (if small enough, or `any_size`) as of the client's
    /// `last_request`.
    pub fn keep(
        last_request: Option<Stamp>,
        custom: &[String],
        state: &SessionState,
        any_size: bool,
    ) -> Option<Box<Self>> {
        (any_size || state.size <= MAX_KEPT_BYTES).then(|| {
            Box::new(Self {
                last_request,
                custom: custom.to_vec(),
                state: state.clone(),
            })
        })
    }

    /// The state, if the client has sent nothing since it was known and
    /// the same custom settings are asked for.
    pub fn still_holds(
        self,
        last_request: Option<Stamp>,
        custom: &[String],
    ) -> Option<SessionState> {
        (self.last_request == last_request && self.custom == custom).then_some(self.state)
    }
}

/// The state of a session whose client has sent nothing since it logged
/// in (`last_request` is `None`; the tracker keeps its clock across moves
/// and hand-offs): what a login with the same startup packet gives, so
/// nothing to replay on a target that logs in the same way. Settings from
/// the startup packet, `ALTER ROLE/DATABASE ... SET` and login-time hooks
/// are not session state (`pg_settings.source` is not `session`): the
/// target's own login applies them, as the capture's replay would leave
/// them. Everything a capture refuses a move for (temporary tables,
/// advisory locks, LISTEN, WITH HOLD cursors) needs a client statement.
pub fn login_state(last_request: Option<Stamp>) -> Option<SessionState> {
    last_request.is_none().then(SessionState::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SessionState {
        SessionState {
            settings: vec![("search_path".into(), "app".into())],
            size: 40,
            ..SessionState::default()
        }
    }

    #[test]
    fn holds_until_the_client_sends_anything() {
        let at = Some(Stamp { tag: b'Q', tick: 7 });
        let names = vec!["app.tenant".to_owned()];
        let k = KnownState::keep(at, &names, &state(), false).unwrap();
        assert_eq!(k.still_holds(at, &names), Some(state()));
        let k = KnownState::keep(at, &names, &state(), false).unwrap();
        assert_eq!(
            k.still_holds(Some(Stamp { tag: b'S', tick: 9 }), &names),
            None
        );
        let k = KnownState::keep(None, &names, &state(), false).unwrap();
        assert_eq!(k.still_holds(at, &names), None, "first message after login");
        let k = KnownState::keep(at, &names, &state(), false).unwrap();
        assert_eq!(k.still_holds(at, &[]), None, "other custom names");
    }

    #[test]
    fn a_session_that_sent_nothing_has_its_login_state() {
        assert_eq!(login_state(None), Some(SessionState::default()));
        assert_eq!(login_state(Some(Stamp { tag: b'S', tick: 1 })), None);
    }

    #[test]
    fn big_states_are_not_kept() {
        let big = SessionState {
            size: MAX_KEPT_BYTES + 1,
            ..state()
        };
        assert!(KnownState::keep(None, &[], &big, false).is_none());
        assert!(KnownState::keep(None, &[], &big, true).is_some());
    }
}
