//! Telling systemd about this process (`Type=notify`): readiness, and
//! after a takeover, which process is now the service's main one.

/// Sends `message` to `NOTIFY_SOCKET`; nothing when it is not set.
pub fn notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "sd_notify: no socket");
            return;
        }
    };
    // An abstract socket name starts with '@'.
    let sent = match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(message.as_bytes(), &a))
        }
        None => sock.send_to(message.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}
