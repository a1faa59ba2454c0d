//! Real servers that tests start for themselves (feature `testing`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A MongoDB-wire server for a test: `SMARTDB_TEST_MONGODB_URI` if set (a real MongoDB; tests
/// then keep to databases of their own), else a SecantusDB on WiredTiger (`pip install
/// SecantusDB`, which `scripts/test` does) started in memory on a free port and stopped on drop.
pub struct MongoServer {
    child: Option<Child>,
    /// Where it listens, e.g. `mongodb://127.0.0.1:40123/?directConnection=true`.
    pub uri: String,
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl MongoServer {
    /// Starts (or names) the server; panics with what to install when there is none.
    pub fn start() -> Self {
        if let Ok(uri) = std::env::var("SMARTDB_TEST_MONGODB_URI") {
            return Self { child: None, uri };
        }
        let mut child = Command::new("secantusd-py")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--storage-path", ":memory:", "--log-level", "INFO"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "this test needs a MongoDB-wire server: set SMARTDB_TEST_MONGODB_URI, or \
                     install SecantusDB (`python3 -m pip install SecantusDB`, as scripts/test \
                     does) so that `secantusd-py` is on PATH ({e})"
                )
            });
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let port = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("secantusd-py exited before it listened");
            };
            if let Some((_, port)) = line.split_once("listening on 127.0.0.1:") {
                break port.trim().to_owned();
            }
        };
        // Keep reading its log, or it stalls once the pipe is full.
        std::thread::spawn(move || lines.for_each(drop));
        Self {
            child: Some(child),
            uri: format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
        }
    }

    /// The URI with `database` as its default database (`mongodb://host/<database>?...`).
    pub fn uri_for(&self, database: &str) -> String {
        let (base, query) = match self.uri.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (self.uri.as_str(), String::new()),
        };
        let hosts_at = base.find("://").map_or(0, |i| i + 3);
        let hosts = match base[hosts_at..].find('/') {
            Some(slash) => &base[..hosts_at + slash],
            None => base,
        };
        format!("{hosts}/{database}{query}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_for_puts_the_database_after_the_hosts() {
        let named = |uri: &str| MongoServer {
            child: None,
            uri: uri.to_owned(),
        };
        assert_eq!(
            named("mongodb://127.0.0.1:1/?directConnection=true").uri_for("t"),
            "mongodb://127.0.0.1:1/t?directConnection=true"
        );
        assert_eq!(
            named("mongodb://u:p@a:1,b:2/old?replicaSet=rs").uri_for("t"),
            "mongodb://u:p@a:1,b:2/t?replicaSet=rs"
        );
        assert_eq!(named("mongodb://a:1").uri_for("t"), "mongodb://a:1/t");
    }
}
