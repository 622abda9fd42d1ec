//! Ports for servers the tests start themselves, and waiting for them.
//!
//! A port found by binding port 0 lies in the kernel's ephemeral range,
//! the range every `bind(0)` and every outgoing connection draws from.
//! Between the moment it is found (and the probe socket closed) and the
//! moment the child binds it, another test's listener on port 0 or an
//! outgoing connection can take it: the child then fails to bind, while a
//! readiness probe connects to whoever took the port and reports it
//! ready. A CI run failed this way (Varnish in front of cachegate: ready,
//! then "connection refused" once the other test's server had gone).
//! Ports are therefore picked below the ephemeral range, as
//! `scripts/lib.sh` picks the services' ports, and never twice in one
//! process; the services already listening there are skipped by the bind.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// The loopback ports tests may give a child: from 20000 up to the start
/// of the ephemeral range (`net.ipv4.ip_local_port_range`).
fn port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 21_000 {
        (20_000, ephemeral_low)
    } else if ephemeral_low > 2_048 {
        (1_024, ephemeral_low)
    } else {
        panic!(
            "the ephemeral port range starts at {ephemeral_low}: no room below it \
             for test servers (raise net.ipv4.ip_local_port_range)"
        )
    }
}

/// A random number (std's randomly keyed hasher: no dependency for it).
fn random(salt: u64) -> u64 {
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.write_u32(std::process::id());
    if let Ok(since) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        h.write_u128(since.as_nanos());
    }
    h.finish()
}

/// A loopback TCP port nothing listens on right now, below the ephemeral
/// range, never given out before by this process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let (low, high) = port_range();
    let span = u64::from(high - low);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for attempt in 0..4_000u64 {
        let candidate = low + (random(attempt) % span) as u16;
        if given.contains(&candidate) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
            given.insert(candidate);
            return candidate;
        }
    }
    panic!("no free loopback port in {low}..{high} after 4000 tries");
}

/// Wait until `child`, a server a test started, accepts connections on
/// `port` (loopback). Panics naming `what` if it exits first or `limit`
/// passes. A connection counts only while the child is still running (a
/// child that lost its port exits, whoever holds the port answers) and
/// when it is not the kernel connecting the probe to itself (possible for
/// a port inside the ephemeral range that nothing listens on). A foreign
/// listener on the port while the child still starts cannot be told from
/// the child: that is what picking ports outside the ephemeral range, and
/// never twice, prevents.
pub fn wait_listening(child: &mut Child, port: u16, what: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let connected = TcpStream::connect(("127.0.0.1", port))
            .ok()
            .filter(|s| s.local_addr().ok() != s.peer_addr().ok());
        match child.try_wait() {
            Ok(Some(status)) => panic!("{what} exited ({status}) before listening on {port}"),
            Ok(None) if connected.is_some() => return,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_free_and_never_repeated() {
        let (low, high) = port_range();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was given twice");
        for p in ports {
            assert!((low..high).contains(&p), "{p} outside {low}..{high}");
            TcpListener::bind(("127.0.0.1", p)).expect("a given port can be bound");
        }
    }

    #[test]
    fn a_child_that_exits_is_reported_not_waited_for() {
        let port = free_port();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_listening(&mut child, port, "true", Duration::from_secs(5))
        }))
        .unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.contains("exited"), "{msg}");
    }
}
