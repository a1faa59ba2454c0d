//! Listening sockets handed from a parent process to a service, with systemd's socket-activation
//! protocol: `LISTEN_FDS=N` descriptors from fd 3, for this process if `LISTEN_PID` names it (or
//! is absent, as when a supervisor cannot know the pid before it starts the child).
//!
//! `smartdb up` binds every service's ports itself and hands the bound sockets over, so no other
//! program can take a port between the moment `up` picks it and the moment the service listens.
//! Under systemd, socket units work the same way. A service takes an inherited socket when its
//! address is exactly the one it was told to listen on, and binds the address itself otherwise.
//!
//! Our own code rather than the `listenfd` crate: that crate removes the variables with
//! `std::env::remove_var`, which is unsound once the runtime's threads run (they may read the
//! environment at the same time), and it finds sockets by position, not by address.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::{Mutex, OnceLock};

/// The first descriptor of the protocol.
const FIRST_FD: RawFd = 3;
/// More than any service listens on; bounds what a malformed `LISTEN_FDS` makes us inspect.
const MAX_FDS: RawFd = 16;

/// The inherited TCP listeners not yet taken.
fn inherited() -> &'static Mutex<Vec<TcpListener>> {
    static INHERITED: OnceLock<Mutex<Vec<TcpListener>>> = OnceLock::new();
    INHERITED.get_or_init(|| Mutex::new(read_environment()))
}

fn read_environment() -> Vec<TcpListener> {
    let Some(count) = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse::<RawFd>().ok())
    else {
        return Vec::new();
    };
    match std::env::var("LISTEN_PID") {
        Ok(pid)
            if !pid.is_empty() && pid.trim().parse::<u32>().ok() != Some(std::process::id()) =>
        {
            return Vec::new();
        }
        _ => {}
    }
    (FIRST_FD..FIRST_FD + count.clamp(0, MAX_FDS))
        .filter_map(listening_tcp)
        .collect()
}

/// The descriptor as a TCP listener, if it is one (anything else is left alone).
fn listening_tcp(fd: RawFd) -> Option<TcpListener> {
    let option = |name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // Fails on a descriptor that is not a socket (or not open).
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    if option(libc::SO_ACCEPTCONN) != Some(1) || option(libc::SO_TYPE) != Some(libc::SOCK_STREAM) {
        return None;
    }
    // Ours now (the protocol hands them to this process); not to be passed on to our children.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    if listener.local_addr().is_err() {
        // A Unix socket: not ours to close.
        let _ = listener.into_raw_fd();
        return None;
    }
    Some(listener)
}

/// The inherited listener bound to exactly `addr`, if there is one; each is taken once.
pub fn take(addr: SocketAddr) -> Option<TcpListener> {
    let mut inherited = inherited().lock().unwrap_or_else(|e| e.into_inner());
    let at = inherited
        .iter()
        .position(|l| l.local_addr().ok() == Some(addr))?;
    Some(inherited.swap_remove(at))
}

/// Makes `command` hand `listeners` to the process it starts (as fds 3, 4, ... with
/// `LISTEN_FDS`); the caller may close its own copies once the process started.
pub fn hand_over(command: &mut std::process::Command, listeners: &[&TcpListener]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fds: Vec<RawFd> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    assert!(
        fds.len() <= MAX_FDS as usize,
        "too many listeners to hand over"
    );
    command
        .env("LISTEN_FDS", fds.len().to_string())
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES");
    // Runs in the child between fork and exec, so only async-signal-safe calls. Each socket is
    // first copied above the target numbers, so that moving one to its number can never
    // overwrite another still waiting to move. The copies close at exec; dup2's do not.
    unsafe {
        command.pre_exec(move || {
            let mut high = [0 as RawFd; MAX_FDS as usize];
            for (slot, &fd) in high.iter_mut().zip(&fds) {
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, FIRST_FD + MAX_FDS);
                if *slot < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high.iter().take(fds.len()).enumerate() {
                if libc::dup2(fd, FIRST_FD + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}
