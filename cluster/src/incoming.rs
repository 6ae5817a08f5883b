// SPDX-License-Identifier: Apache-2.0
//! The destination side of moves: one migration port for all VMs. Each connection starts with
//! a `Route` frame naming the move; the agent checks the move is one of its own (in the cluster's
//! records, to this host, not started, from the host it claims to come from) and hands the
//! connection to a new destination VMM (`vmm run --incoming-fd`), keeping the VMM's commit hook.
//!
//! A move that may switch to post-copy opens more connections, with the same route: its fault
//! connection, and after a broken link its reconnections. Those go to the VMM that took the
//! first one, over a unix socket it was given for this (`--incoming-conns-fd`, one descriptor per
//! message), for as long as that VMM keeps its end open (it closes it once it needs no more:
//! at once for a pre-copy migration, at the end of post-copy otherwise). The VMM does the TLS
//! handshake and checks the migration's id on each, as it does on its own listener.
//!
//! The commit point: when the VMM reports `PREPARE` (the source is about to pause the guest),
//! the agent makes the commit transaction (`ownership::commit`) and only then lets the VMM
//! answer. So the guest runs here only after the transaction succeeded, and the transaction's
//! round trip happens while the guest still runs on the source: none of it is downtime. If the
//! VMM ends after the commit without having reported `COMPLETE`, the guest never ran here and
//! the agent hands the VM back to the source, whose paused copy is then the guest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use migration::protocol::{self, Command, Response};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use vmm::api::VmState;
use vmm::migrate::hook;

use crate::agent::{Agent, Handed};
use crate::local::LocalVm;
use crate::model::{MoveTimes, VmPhase};
use crate::ownership::{self, Accepted};
use crate::store::Store;

/// How long a new connection may take to name its move.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts migration connections until cancelled.
pub async fn listen<S: Store>(agent: Arc<Agent<S>>, listener: tokio::net::TcpListener) {
    let mut cancel = agent.cancel.clone();
    loop {
        let accepted = tokio::select! {
            _ = cancel.wait_for(|c| *c) => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(why) = handle(&agent, stream, peer).await {
                        tracing::warn!(%peer, why, "refused an incoming migration");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a migration connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Tells the source why not (it reads this as the answer to its `Start`) and hangs up.
async fn refuse(conn: std::net::TcpStream, why: String) -> String {
    let answer = Response::error(format!("the destination host refused the move: {why}"));
    let _ = tokio::task::spawn_blocking(move || {
        let mut conn = conn;
        let _ = protocol::write_json(&mut conn, Command::Response, &answer);
        let _ = conn.shutdown(std::net::Shutdown::Both);
    })
    .await;
    why
}

async fn handle<S: Store>(
    agent: &Arc<Agent<S>>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Result<(), String> {
    let conn = stream.into_std().map_err(|e| e.to_string())?;
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(ROUTE_TIMEOUT)).map_err(|e| e.to_string())?;
    let (conn, route) = tokio::task::spawn_blocking(move || {
        let mut c = conn;
        let r = protocol::read_route(&mut c);
        (c, r)
    })
    .await
    .map_err(|e| e.to_string())?;
    let route = match route {
        Ok(r) => r,
        Err(e) => return Err(refuse(conn, format!("no valid Route frame first ({e})")).await),
    };
    // The destination VMM sets its own timeouts; none while the agent waits on it.
    let _ = conn.set_read_timeout(None);
    if let Some((from, channel)) = agent.handed(&route) {
        return hand_over(agent, &route, from, &channel, conn, peer).await;
    }
    let Some(_lease) = agent.live_lease() else {
        return Err(refuse(conn, format!("host {} has no live lease (fenced)", agent.me())).await);
    };
    let accepted = match ownership::accept(&agent.store, agent.me(), &route).await {
        Ok(a) => a,
        Err(why) => return Err(refuse(conn, why).await),
    };
    let m = accepted.mv.value.clone();
    // Plaintext: the source is recognised by its address only (TLS will check its identity).
    if let Some(from) = agent.host_record(&m.from)
        && let Ok(addr) = from.migration_addr.parse::<SocketAddr>()
        && addr.ip() != peer.ip()
    {
        return Err(refuse(conn, format!("move {route} comes from host {} at {}, not {peer}", m.from, addr.ip())).await);
    }
    let Some(guard) = agent.claim(&m.vm) else {
        return Err(refuse(conn, format!("VM {} is busy on this host", m.vm)).await);
    };
    let (hook_agent, hook_vmm) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let (conns_agent, conns_vmm) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    // Before the VMM starts, so that a later connection that comes at once finds its way (it
    // waits in the socket until the VMM reads it); if the VMM does not start, its end closes
    // and the move is forgotten here.
    if let Err(e) = keep_channel(agent, &m.id, peer.ip(), conns_agent) {
        tracing::warn!(move_id = %m.id, error = e, "no channel for later connections: this move cannot switch to post-copy");
    }
    let epoch = m.epoch + 1;
    let started = {
        let (agent, rec, id) = (agent.clone(), accepted.vm.value.clone(), m.id.clone());
        tokio::task::spawn_blocking(move || {
            let r = agent.runner.receive(&rec, epoch, &id, &conn, &hook_vmm, &conns_vmm);
            (r, conn)
        })
        .await
        .map_err(|e| e.to_string())?
    };
    let local = match started {
        (Ok(l), _conn) => l,
        (Err(e), conn) => return Err(refuse(conn, format!("cannot start a destination VMM: {e}")).await),
    };
    tracing::info!(vm = %m.vm, move_id = %m.id, from = %m.from, pid = local.pid, "receiving a VM");
    agent.set_local(local.clone());
    serve_hook(agent, accepted, local, hook_agent).await;
    drop(guard);
    Ok(())
}

/// The channel's descriptor, for `ScmSocket` (tokio's socket says when it is writable; the
/// message with the descriptor is sent on the same socket).
struct ChannelFd(std::os::fd::RawFd);

impl vmm_sys_util::sock_ctrl_msg::ScmSocket for ChannelFd {
    fn socket_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// How long a later connection may wait for its destination VMM to take it.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes `channel` (the agent's end of a destination VMM's `--incoming-conns-fd`) the way for
/// move `move_id`'s later connections from `from`, until the VMM closes its end.
fn keep_channel<S: Store>(
    agent: &Arc<Agent<S>>,
    move_id: &str,
    from: std::net::IpAddr,
    channel: std::os::unix::net::UnixStream,
) -> Result<(), String> {
    channel.set_nonblocking(true).map_err(|e| e.to_string())?;
    let channel: Handed = Arc::new(tokio::net::UnixStream::from_std(channel).map_err(|e| e.to_string())?);
    agent.set_handed(move_id, from, channel.clone());
    let (agent, move_id) = (agent.clone(), move_id.to_string());
    tokio::spawn(async move {
        // The VMM never writes on it: readable means closed (or broken).
        let mut byte = [0u8; 1];
        loop {
            if channel.readable().await.is_err() {
                break;
            }
            match channel.try_read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
        agent.drop_handed(&move_id);
    });
    Ok(())
}

/// Hands a later connection of move `route` (post-copy's) to its destination VMM, if it comes
/// from where the move's first connection came from.
async fn hand_over<S: Store>(
    agent: &Arc<Agent<S>>,
    route: &str,
    from: std::net::IpAddr,
    channel: &Handed,
    conn: std::net::TcpStream,
    peer: SocketAddr,
) -> Result<(), String> {
    if peer.ip() != from {
        return Err(refuse(conn, format!("move {route} comes from {from}, not {peer}")).await);
    }
    use std::os::fd::AsRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let (fd, socket) = (conn.as_raw_fd(), ChannelFd(channel.as_raw_fd()));
    let send = async {
        loop {
            channel.writable().await?;
            // One byte with the descriptor: the VMM reads a message per connection.
            let sent = channel.try_io(tokio::io::Interest::WRITABLE, || {
                socket.send_with_fd(&[0u8][..], fd).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
            });
            match sent {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    };
    match tokio::time::timeout(HAND_OVER_TIMEOUT, send).await {
        // The VMM has its own copy now; this one closes.
        Ok(Ok(_)) => {
            tracing::info!(move_id = route, %peer, "handed a later connection of the move to its VMM");
            Ok(())
        }
        Ok(Err(e)) => {
            if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)) {
                agent.drop_handed(route);
            }
            Err(refuse(conn, format!("the destination VMM of move {route} takes no more connections ({e})")).await)
        }
        Err(_) => {
            let why = format!("the destination VMM of move {route} did not take the connection within 5 s");
            Err(refuse(conn, why).await)
        }
    }
}

/// Answers the destination VMM's commit hook, then settles how the move ended.
async fn serve_hook<S: Store>(
    agent: &Arc<Agent<S>>,
    accepted: Accepted,
    mut local: LocalVm,
    hook_agent: std::os::unix::net::UnixStream,
) {
    let m = accepted.mv.value.clone();
    let (vm, epoch) = (m.vm.clone(), local.epoch);
    let mut committed: Option<(i64, MoveTimes)> = None;
    let mut running = false;
    let stream = hook_agent.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(hook_agent));
    match stream {
        Ok(stream) => {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match line.as_str() {
                    hook::PREPARE => {
                        let answer = match agent.live_lease() {
                            None => format!("{} host {} has no live lease (fenced)", hook::REFUSED, agent.me()),
                            Some(lease) => {
                                match ownership::commit(&agent.store, agent.me(), lease.id(), &accepted).await {
                                    Ok(c) => {
                                        local.committed_revision = Some(c.0);
                                        committed = Some(c);
                                        hook::COMMITTED.to_string()
                                    }
                                    Err(why) => format!("{} {why}", hook::REFUSED),
                                }
                            }
                        };
                        let sent = write.write_all(format!("{answer}\n").as_bytes()).await;
                        if committed.is_some() {
                            tracing::info!(vm, move_id = %m.id, "committed: the VM is this host's");
                            agent.set_local(local.clone());
                            agent
                                .report(&vm, epoch, VmPhase::Starting, Some(format!("arriving from {}", m.from)))
                                .await;
                        } else {
                            tracing::warn!(vm, move_id = %m.id, answer, "commit refused");
                        }
                        if sent.is_err() {
                            break;
                        }
                    }
                    hook::COMPLETE => {
                        local.may_run = true;
                        agent.set_local(local.clone());
                    }
                    line if line.split(' ').next() == Some(hook::RUNNING) => {
                        running = true;
                        let field = |name: &str| {
                            line.split(' ').find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse::<u64>().ok())
                        };
                        let arrival = ownership::Arrival {
                            commit_done_us: committed.as_ref().and_then(|c| c.1.commit_done_us),
                            resumed_us: field("resumed_at_us"),
                            downtime_us: field("downtime_us"),
                        };
                        match ownership::finish(&agent.store, &vm, &m.id, arrival).await {
                            Ok(_) => tracing::info!(vm, move_id = %m.id, "moved here: the VM runs on this host"),
                            Err(e) => {
                                tracing::warn!(vm, error = %e, "cannot record the move's end (the reconciler retries)")
                            }
                        }
                        agent.report(&vm, epoch, VmPhase::Running, None).await;
                    }
                    other => tracing::warn!(vm, line = other, "unexpected line from the destination VMM's hook"),
                }
            }
        }
        Err(e) => tracing::error!(vm, error = %e, "cannot serve the destination VMM's hook"),
    }
    if running {
        return;
    }
    // The hook ended without the guest running: the VMM is ending (or ended).
    for _ in 0..300 {
        if !agent.runner.alive(&local) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if agent.runner.alive(&local) && local.may_run {
        // It runs the guest but did not say so: the reconciler finishes the move.
        return;
    }
    agent.runner.kill(&local);
    let why = format!("the destination VMM ended: {}", agent.runner.log_tail(&local));
    match committed {
        Some((revision, _)) if !local.may_run => {
            match ownership::hand_back(&agent.store, &m, revision, &why).await {
                Ok(true) => tracing::warn!(vm, move_id = %m.id, why, "handed the VM back to its source"),
                Ok(false) => tracing::warn!(vm, move_id = %m.id, "the VM changed meanwhile: not handed back"),
                // The reconciler tries again (the local record says committed, not may-run).
                Err(e) => {
                    tracing::error!(vm, error = %e, "cannot hand the VM back yet");
                    return;
                }
            }
            agent.drop_local(&local);
        }
        Some(_) => {
            // It may have run here: the VM is lost; the source must not resume its copy.
            let _ = ownership::finish(&agent.store, &vm, &m.id, ownership::Arrival::default()).await;
            agent.report(&vm, epoch, VmPhase::Lost, Some(why)).await;
        }
        None => {
            tracing::info!(vm, move_id = %m.id, why, "incoming migration ended before its commit");
            agent.drop_local(&local);
        }
    }
}

/// A committed incoming VMM found by a restarted agent: ends the move once the VMM runs the
/// guest (it does so on `Complete` without its hook).
pub async fn finish_adopted<S: Store>(agent: &Arc<Agent<S>>, vm: &str, move_id: &str, epoch: u64) {
    let Some(l) = agent.local(vm, epoch) else { return };
    let api = agent.runner.api(&l);
    for _ in 0..600 {
        let a = api.clone();
        if let Ok(Ok(info)) = tokio::task::spawn_blocking(move || a.get_vm()).await
            && info.state == VmState::Running
        {
            if let Ok(true) = ownership::finish(&agent.store, vm, move_id, ownership::Arrival::default()).await {
                tracing::info!(vm, move_id, "moved here (finished after an agent restart)");
            }
            agent.report(vm, epoch, VmPhase::Running, None).await;
            return;
        }
        if !agent.runner.alive(&l) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
