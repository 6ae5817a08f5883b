// SPDX-License-Identifier: Apache-2.0
//! A minimal QMP client (QEMU's JSON control protocol on a unix socket): enough to set
//! migration parameters, start a migration, follow it and quit.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Asynchronous events seen so far (they come in between command answers).
    events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying until `timeout`, QEMU creates the socket while it starts), reads the
    /// greeting and leaves capability negotiation.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(format!("QMP socket {}: {e}", path.display())),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer, events: Vec::new() };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP: QEMU closed the connection".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP: bad JSON {line:?}: {e}")),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    /// Runs a command; returns its `return` value (events in between are skipped).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP: {e}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {command}: {e}"));
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// When event `name` happened (host wall clock, µs since the epoch), waiting for it up to
    /// `timeout` if it has not come yet.
    pub fn event_time(&mut self, name: &str, timeout: Duration) -> Result<u64, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.iter().find(|e| e["event"] == name) {
                let t = &e["timestamp"];
                return match (t["seconds"].as_u64(), t["microseconds"].as_u64()) {
                    (Some(s), Some(us)) => Ok(s * 1_000_000 + us),
                    _ => Err(format!("QMP event without a timestamp: {e}")),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("QMP: no {name} event within {timeout:?}"));
            }
            self.reader.get_ref().set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            let v = self.read();
            self.reader.get_ref().set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
            let v = v?;
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}
