// SPDX-License-Identifier: Apache-2.0
//! The API's routes: which (method, path) pairs exist, and how a request's method, path and body
//! become an [`ApiRequest`]. No sockets here, so the whole request side is testable on its own.

use super::types::{ApiError, ApiRequest, ApiResponse, MigrateRequest, MigrationMode, RestoreRequest, SnapshotRequest};
use crate::migrate::params::DEFAULT_MAX_ROUNDS;

/// One thing the API can be asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    GetVm,
    Pause,
    Resume,
    Shutdown,
    Migrate,
    GetMigration,
    Snapshot,
    GetSnapshot,
    Metrics,
    Restore,
}

/// Every endpoint with its method and path. The router reads this table and nothing else, and
/// [`ROUTES`] is derived from it, so the OpenAPI document's sync test checks what is served.
const TABLE: [(&str, &str, Endpoint); 10] = [
    ("GET", "/vm", Endpoint::GetVm),
    ("PUT", "/vm/pause", Endpoint::Pause),
    ("PUT", "/vm/resume", Endpoint::Resume),
    ("PUT", "/vm/shutdown", Endpoint::Shutdown),
    ("PUT", "/vm/migrate", Endpoint::Migrate),
    ("GET", "/vm/migration", Endpoint::GetMigration),
    ("PUT", "/vm/snapshot", Endpoint::Snapshot),
    ("GET", "/vm/snapshot", Endpoint::GetSnapshot),
    ("GET", "/metrics", Endpoint::Metrics),
    ("PUT", "/vm/restore", Endpoint::Restore),
];

/// The (method, path) pairs the server answers.
pub const ROUTES: &[(&str, &str)] = &method_path_pairs(TABLE);

const fn method_path_pairs<const N: usize>(
    table: [(&'static str, &'static str, Endpoint); N],
) -> [(&'static str, &'static str); N] {
    let mut out = [("", ""); N];
    let mut i = 0;
    while i < N {
        out[i] = (table[i].0, table[i].1);
        i += 1;
    }
    out
}

/// Why a (method, path) pair names no endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// No route has this path (HTTP 404).
    NotFound,
    /// The path exists but not with this method (HTTP 405); these are the methods it has.
    MethodNotAllowed(Vec<&'static str>),
}

/// Finds the endpoint for `method` on `path` (the request target without its query string).
pub fn route(method: &str, path: &str) -> Result<Endpoint, RouteError> {
    let mut allowed = Vec::new();
    for &(m, p, endpoint) in &TABLE {
        if p != path {
            continue;
        }
        if m == method {
            return Ok(endpoint);
        }
        allowed.push(m);
    }
    if allowed.is_empty() { Err(RouteError::NotFound) } else { Err(RouteError::MethodNotAllowed(allowed)) }
}

impl Endpoint {
    /// Whether requests to this endpoint carry a body worth reading.
    pub fn takes_body(self) -> bool {
        matches!(self, Endpoint::Migrate | Endpoint::Snapshot | Endpoint::Restore)
    }

    /// The request for the VMM thread. Only `PUT /vm/migrate`, `PUT /vm/snapshot` and
    /// `PUT /vm/restore` look at `body`; other endpoints ignore theirs, as clients like
    /// `curl -X PUT -d ''` send one anyway.
    pub fn request(self, body: &[u8]) -> Result<ApiRequest, ApiError> {
        Ok(match self {
            Endpoint::GetVm => ApiRequest::GetVm,
            Endpoint::Pause => ApiRequest::Pause,
            Endpoint::Resume => ApiRequest::Resume,
            Endpoint::Shutdown => ApiRequest::Shutdown,
            Endpoint::Migrate => ApiRequest::Migrate(parse_migrate(body)?),
            Endpoint::GetMigration => ApiRequest::GetMigration,
            Endpoint::Snapshot => ApiRequest::Snapshot(parse_snapshot(body)?),
            Endpoint::GetSnapshot => ApiRequest::GetSnapshot,
            Endpoint::Metrics => ApiRequest::Metrics,
            Endpoint::Restore => ApiRequest::Restore(parse_restore(body)?),
        })
    }

    /// The status of a successful answer.
    pub fn success_status(self) -> u16 {
        match self {
            Endpoint::GetVm
            | Endpoint::GetMigration
            | Endpoint::GetSnapshot
            | Endpoint::Metrics
            | Endpoint::Restore => 200,
            Endpoint::Pause | Endpoint::Resume | Endpoint::Shutdown => 204,
            Endpoint::Migrate | Endpoint::Snapshot => 202,
        }
    }

    /// Whether `response` is what this endpoint promises (and so has the documented status code);
    /// anything else is a VMM bug that the server reports as a 500 rather than pass on.
    pub fn expects(self, response: &ApiResponse) -> bool {
        matches!(
            (self, response),
            (Endpoint::GetVm, ApiResponse::Vm(_))
                | (Endpoint::Pause | Endpoint::Resume | Endpoint::Shutdown, ApiResponse::Done)
                | (Endpoint::Migrate | Endpoint::Snapshot, ApiResponse::Accepted)
                | (Endpoint::GetMigration, ApiResponse::Migration(_))
                | (Endpoint::GetSnapshot, ApiResponse::Snapshot(_))
                | (Endpoint::Metrics, ApiResponse::Metrics(_))
                | (Endpoint::Restore, ApiResponse::Restored(_))
        )
    }
}

/// A request body as JSON; an empty one is refused naming what it should hold (`fields`).
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], fields: &str) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(format!(
            "invalid body: expected a JSON object with {fields}, got an empty body"
        )));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))
}

/// Parses and checks a `PUT /vm/migrate` body. Messages name the offending field, as serde_json's
/// own messages do for type errors and missing or unknown fields.
pub fn parse_migrate(body: &[u8]) -> Result<MigrateRequest, ApiError> {
    let req: MigrateRequest = json_body(body, "at least the field `to`")?;
    validate_migrate(&req)?;
    Ok(req)
}

fn validate_migrate(req: &MigrateRequest) -> Result<(), ApiError> {
    let bad = |field: &str, why: String| Err(ApiError::BadRequest(format!("invalid field `{field}`: {why}")));
    if !is_host_port(&req.to) {
        return bad("to", format!("expected HOST:PORT with a numeric port, got {:?}", req.to));
    }
    // Zero would mean "never pause", "send nothing" or "no rounds": none can finish, so they are
    // refused here rather than discovered by a migration that hangs.
    if req.downtime_ms == Some(0) {
        return bad("downtime_ms", "must be greater than 0".to_string());
    }
    if req.max_bandwidth_mib_s == Some(0) {
        return bad("max_bandwidth_mib_s", "must be greater than 0 (leave it out for no limit)".to_string());
    }
    if req.max_rounds == Some(0) {
        return bad("max_rounds", "must be at least 1".to_string());
    }
    if let Some(ms) = req.stall_timeout_ms
        && ms < crate::transport::link::MIN_STALL_TIMEOUT.as_millis() as u64
    {
        return bad(
            "stall_timeout_ms",
            format!("must be at least {}", crate::transport::link::MIN_STALL_TIMEOUT.as_millis()),
        );
    }
    if req.insecure_plaintext && req.tls_dir.is_some() {
        return bad("insecure_plaintext", "conflicts with `tls_dir`".to_string());
    }
    if let Some(n) = req.precopy_rounds {
        if req.mode != Some(MigrationMode::Postcopy) {
            return bad("precopy_rounds", "only with `mode` postcopy".to_string());
        }
        let max = req.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS);
        if n > max {
            return bad("precopy_rounds", format!("{n} is more than max_rounds ({max})"));
        }
    }
    Ok(())
}

/// Parses and checks a `PUT /vm/snapshot` body.
pub fn parse_snapshot(body: &[u8]) -> Result<SnapshotRequest, ApiError> {
    let req: SnapshotRequest = json_body(body, "at least the field `to`")?;
    if req.to.trim().is_empty() {
        return Err(ApiError::BadRequest("invalid field `to`: expected a directory path, got an empty string".into()));
    }
    Ok(req)
}

/// `PUT /vm/restore`'s body: `from` must be an absolute path, since the VMM's working directory
/// is not the client's.
pub fn parse_restore(body: &[u8]) -> Result<RestoreRequest, ApiError> {
    let req: RestoreRequest = json_body(body, "the field `from`")?;
    if !req.from.starts_with('/') {
        return Err(ApiError::BadRequest(format!(
            "invalid field `from`: expected the snapshot directory's absolute path, got '{}'",
            req.from
        )));
    }
    Ok(req)
}

/// `host:port` with a non-empty host and a port in 1..=65535; `[v6addr]:port` too.
pub fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']').is_some_and(|a| !a.is_empty())
    } else {
        !host.is_empty() && !host.contains(':') && !host.contains(char::is_whitespace)
    };
    host_ok && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_routes_to_itself() {
        for &(method, path, endpoint) in TABLE.iter() {
            assert_eq!(route(method, path), Ok(endpoint), "{method} {path}");
        }
        assert_eq!(ROUTES.len(), TABLE.len());
    }

    #[test]
    fn unknown_path_and_wrong_method() {
        assert_eq!(route("GET", "/nope"), Err(RouteError::NotFound));
        assert_eq!(route("GET", "/vm/"), Err(RouteError::NotFound));
        assert_eq!(route("POST", "/vm"), Err(RouteError::MethodNotAllowed(vec!["GET"])));
        assert_eq!(route("GET", "/vm/pause"), Err(RouteError::MethodNotAllowed(vec!["PUT"])));
    }

    #[test]
    fn migrate_body_parses_with_defaults() {
        let r = parse_migrate(br#"{"to":"10.0.0.2:4000"}"#).unwrap();
        assert_eq!(r.to, "10.0.0.2:4000");
        assert_eq!(r.downtime_ms, None);
        let r = parse_migrate(br#"{"to":"[::1]:4000","downtime_ms":20,"max_rounds":3}"#).unwrap();
        assert_eq!((r.downtime_ms, r.max_rounds), (Some(20), Some(3)));
        let r = parse_migrate(br#"{"to":"h:1","mode":"postcopy","precopy_rounds":0}"#).unwrap();
        assert_eq!((r.mode, r.precopy_rounds), (Some(MigrationMode::Postcopy), Some(0)));
    }

    #[test]
    fn migrate_body_errors_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "`to`"),
            (b"{}", "missing field `to`"),
            (b"{", "invalid body"),
            (br#"{"to":"host"}"#, "`to`"),
            (br#"{"to":"host:port"}"#, "`to`"),
            (br#"{"to":":80"}"#, "`to`"),
            (br#"{"to":"h:0"}"#, "`to`"),
            (br#"{"to":"h:70000"}"#, "`to`"),
            (br#"{"to":"h:1","downtime_ms":0}"#, "`downtime_ms`"),
            (br#"{"to":"h:1","downtime_ms":"5"}"#, "invalid type"),
            (br#"{"to":"h:1","max_rounds":0}"#, "`max_rounds`"),
            (br#"{"to":"h:1","max_bandwidth_mib_s":0}"#, "`max_bandwidth_mib_s`"),
            (br#"{"to":"h:1","speed":1}"#, "unknown field `speed`"),
            (br#"{"to":"h:1","stall_timeout_ms":10}"#, "`stall_timeout_ms`"),
            (br#"{"to":"h:1","tls_dir":"/x","insecure_plaintext":true}"#, "`insecure_plaintext`"),
            (br#"{"to":"h:1","precopy_rounds":0}"#, "`precopy_rounds`: only with `mode` postcopy"),
            (br#"{"to":"h:1","mode":"postcopy_auto","precopy_rounds":1}"#, "`precopy_rounds`"),
            (br#"{"to":"h:1","mode":"postcopy","precopy_rounds":31}"#, "more than max_rounds (30)"),
            (br#"{"to":"h:1","mode":"postcopy","max_rounds":2,"precopy_rounds":3}"#, "more than max_rounds (2)"),
        ];
        for (body, needle) in cases {
            let Err(ApiError::BadRequest(msg)) = parse_migrate(body) else {
                panic!("{} was accepted", String::from_utf8_lossy(body));
            };
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
    }

    #[test]
    fn restore_body() {
        let r = parse_restore(br#"{"from":"/var/snap"}"#).unwrap();
        assert_eq!(r.from, "/var/snap");
        for body in [&b""[..], b"  ", b"{}", br#"{"from":"snap"}"#, br#"{"from":""}"#, br#"{"from":"/s","x":1}"#] {
            let Err(ApiError::BadRequest(msg)) = parse_restore(body) else { panic!("accepted {body:?}") };
            assert!(msg.starts_with("invalid"), "{msg}");
        }
        assert_eq!(route("PUT", "/vm/restore"), Ok(Endpoint::Restore));
        assert!(Endpoint::Restore.takes_body());
    }

    #[test]
    fn snapshot_body() {
        let r = parse_snapshot(br#"{"to":"/var/snap"}"#).unwrap();
        assert_eq!((r.to.as_str(), r.resume, r.with_disks), ("/var/snap", false, false));
        let r = parse_snapshot(br#"{"to":"s","resume":true,"with_disks":true}"#).unwrap();
        assert!(r.resume && r.with_disks);
        for (body, needle) in [
            (&b""[..], "`to`"),
            (b"{}", "missing field `to`"),
            (br#"{"to":""}"#, "`to`"),
            (br#"{"to":"s","resume":1}"#, "invalid type"),
            (br#"{"to":"s","keep":true}"#, "unknown field `keep`"),
        ] {
            let Err(ApiError::BadRequest(msg)) = parse_snapshot(body) else { panic!("accepted") };
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
    }

    #[test]
    fn host_port() {
        for ok in ["a:1", "10.0.0.1:65535", "[::1]:4000", "host.example:80"] {
            assert!(is_host_port(ok), "{ok}");
        }
        for bad in ["", "a", "a:", ":1", "a:b", "a:+1", "::1:80", "[]:1", "a b:1", "a:0"] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn only_promised_responses_pass() {
        assert!(Endpoint::Pause.expects(&ApiResponse::Done));
        assert!(!Endpoint::Pause.expects(&ApiResponse::Accepted));
        assert!(Endpoint::Migrate.expects(&ApiResponse::Accepted));
        assert!(!Endpoint::GetVm.expects(&ApiResponse::Done));
    }
}
