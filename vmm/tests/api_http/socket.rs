// SPDX-License-Identifier: Apache-2.0
//! The socket file: private, never stolen from a live server, removed at the end.

use super::*;

#[test]
fn socket_is_private() {
    let h = Harness::new();
    let mode = std::fs::metadata(h.sock()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    assert_eq!(h.server.path(), h.sock());
}

#[test]
fn live_socket_is_refused() {
    let h = Harness::new();
    let (tx, _rx) = channel();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let err = start_api_server(&h.sock(), tx, wake).err().unwrap();
    assert!(matches!(err, ApiServerError::InUse(_)), "{err:?}");
    assert_eq!(err.to_string(), format!("API socket {} is in use by another process", h.sock().display()));
    // The first server is unharmed.
    assert_eq!(h.client().get_vm().unwrap().state, VmState::Running);
}

#[test]
fn stale_socket_is_replaced_and_other_files_are_not() {
    let dir = TempDir::new();
    // A socket whose listener is gone, as a crashed VMM leaves it.
    drop(UnixListener::bind(dir.sock()).unwrap());
    assert!(dir.sock().exists());
    let (tx, rx) = channel();
    spawn_fake_vmm(rx);
    let server = start_api_server(&dir.sock(), tx, Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())).unwrap();
    assert_eq!(ApiClient::new(dir.sock()).get_vm().unwrap().state, VmState::Running);
    drop(server);

    std::fs::write(dir.sock(), b"precious").unwrap();
    let (tx, _rx) = channel();
    let err = start_api_server(&dir.sock(), tx, Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())).err().unwrap();
    assert!(matches!(err, ApiServerError::NotASocket(_)), "{err:?}");
    assert_eq!(std::fs::read(dir.sock()).unwrap(), b"precious");
}

#[test]
fn socket_is_removed_on_stop_and_drop() {
    let mut h = Harness::new();
    assert!(h.sock().exists());
    h.server.stop();
    assert!(!h.sock().exists());
    h.server.stop();
    assert!(matches!(h.client().get_vm(), Err(ClientError::Connect { .. })));

    let h = Harness::new();
    let sock = h.sock();
    drop(h.server);
    assert!(!sock.exists());
}
