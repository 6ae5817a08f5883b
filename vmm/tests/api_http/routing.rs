// SPDX-License-Identifier: Apache-2.0
//! Every route, its methods and its errors.

use super::*;

#[test]
fn every_route_answers() {
    let h = Harness::new();

    let r = h.send("GET", "/vm", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let vm: VmInfo = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.config, sample_config());

    for (path, state) in [("/vm/pause", VmState::Paused), ("/vm/resume", VmState::Running)] {
        let r = h.send("PUT", path, None);
        assert_eq!((r.status, r.body.len()), (204, 0), "{path}");
        assert_eq!(h.client().get_vm().unwrap().state, state);
    }

    let r = h.send("GET", "/vm/migration", None);
    assert_eq!(r.status, 200);
    assert_eq!(serde_json::from_slice::<MigrationInfo>(&r.body).unwrap().phase, MigrationPhase::None);

    let r = h.send("PUT", "/vm/migrate", Some(r#"{"to":"10.0.0.2:4000","downtime_ms":30}"#));
    assert_eq!(r.status, 202);
    assert_eq!(json(&r), serde_json::json!({"status": "accepted"}));
    let m = h.client().migration().unwrap();
    assert_eq!(m.destination.as_deref(), Some("10.0.0.2:4000"));
    assert_ne!(m.phase, MigrationPhase::None);

    let r = h.send("GET", "/metrics", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("text/plain; version=0.0.4"));
    assert!(String::from_utf8(r.body).unwrap().contains("vmm_api_requests_total "));

    // A query string does not change the route.
    assert_eq!(h.send("GET", "/vm?verbose=1", None).status, 200);

    let r = h.send("PUT", "/vm/shutdown", None);
    assert_eq!(r.status, 204);
    assert_eq!(h.client().get_vm().unwrap().state, VmState::ShuttingDown);

    // Every request woke the VMM thread's event loop.
    assert!(h.wake.read().unwrap() >= 10);
}

#[test]
fn unknown_route_is_404() {
    let h = Harness::new();
    assert_error(&h.send("GET", "/vm/nothing-here", None), 404, "/vm/nothing-here");
    assert_error(&h.send("GET", "/", None), 404, "no such route");
}

#[test]
fn wrong_method_is_405_with_allow() {
    let h = Harness::new();
    let r = h.send("DELETE", "/vm", None);
    assert_error(&r, 405, "DELETE");
    assert_eq!(r.header("Allow"), Some("GET"));
    let r = h.send("GET", "/vm/pause", None);
    assert_error(&r, 405, "/vm/pause");
    assert_eq!(r.header("Allow"), Some("PUT"));
    let r = h.send("POST", "/vm/migrate", Some(r#"{"to":"a:1"}"#));
    assert_eq!((r.status, r.header("Allow")), (405, Some("PUT")));
}

#[test]
fn bad_migrate_bodies_are_400_naming_the_field() {
    let h = Harness::new();
    for (body, needle) in [
        ("", "`to`"),
        ("{", "invalid body"),
        ("[1,2]", "invalid body"),
        ("{}", "missing field `to`"),
        (r#"{"to":42}"#, "invalid type"),
        (r#"{"to":"nohost"}"#, "`to`"),
        (r#"{"to":"host:http"}"#, "`to`"),
        (r#"{"to":"h:1","downtime_ms":0}"#, "`downtime_ms`"),
        (r#"{"to":"h:1","downtime_ms":-5}"#, "invalid value"),
        (r#"{"to":"h:1","max_rounds":0}"#, "`max_rounds`"),
        (r#"{"to":"h:1","turbo":true}"#, "unknown field `turbo`"),
    ] {
        assert_error(&h.send("PUT", "/vm/migrate", Some(body)), 400, needle);
    }
    // None of them reached the VMM.
    assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
}

#[test]
fn vmm_errors_pass_through() {
    let h = Harness::new();
    assert_error(&h.send("PUT", "/vm/resume", None), 409, "cannot resume");
    match h.client().resume() {
        Err(ClientError::Api { status: 409, message }) => assert!(message.contains("cannot resume"), "{message}"),
        other => panic!("{other:?}"),
    }
    h.client().migrate(&MigrateRequest { to: "h:1".into(), ..migrate_defaults() }).unwrap();
    assert_error(&h.send("PUT", "/vm/migrate", Some(r#"{"to":"h:1"}"#)), 409, "cannot migrate");
}

#[test]
fn oversized_bodies_are_413() {
    let h = Harness::new();
    // Refused on the announced length, before reading anything.
    let big = "x".repeat(100 * 1024);
    assert_error(&h.send("PUT", "/vm/migrate", Some(&big)), 413, "too large");
    // A chunked body has no announced length: refused once the reader passes the cap.
    let chunk = "y".repeat(16 * 1024);
    let mut request =
        b"PUT /vm/migrate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        request.extend_from_slice(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(&h.sock(), &request);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
}
