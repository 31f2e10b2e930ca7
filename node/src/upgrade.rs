//! Seamless upgrade: a new `shoal node` started on the data directory of a running one takes
//! over its listening sockets instead of binding new ones, so no client is refused.
//!
//! The running node listens on `<data-dir>/upgrade.sock` (a unix socket only the data
//! directory's owner can reach). A starting node connects to it before anything else:
//! 1. new → old: `{"takeover":{"pid":…,"version":…}}`;
//! 2. the old node stops its control plane (health checks, Raft, gossip, admin API), which
//!    frees the data directory and the cluster ports, while its data plane goes on accepting
//!    and serving with the last routing table;
//! 3. old → new: the listening sockets (data plane and admin) over SCM_RIGHTS, each message a
//!    length-prefixed JSON description with the descriptors attached;
//! 4. the new node starts on them, but its accept loops wait until it is ready (leader known,
//!    log applied, health verdicts in); then new → old: `{"accepting":true}`;
//! 5. the old node stops accepting and serves its established connections (WebSockets
//!    included) until they end or `--upgrade-drain` expires, then exits.
//!
//! If the new node dies before step 4 the old one keeps serving and waits for another takeover.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use crate::dataplane::ListenerKind;

/// The socket's file name in the data directory.
pub const SOCKET: &str = "upgrade.sock";
/// Descriptors per message: below the kernel's limit of 253 (`SCM_MAX_FD`).
const FDS_PER_MESSAGE: usize = 128;
/// A description message is small; a larger length prefix is a protocol error.
const MAX_MESSAGE: usize = 1 << 20;
/// How long the new node waits for the old one to release the data directory.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the old node waits for the new one to accept (it waits up to 30 s for readiness).
const ACCEPTING_TIMEOUT: Duration = Duration::from_secs(120);

/// What a handed-over socket serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Http,
    Https,
    Tcp(u16),
}

impl Role {
    fn of(kind: &ListenerKind) -> Role {
        match kind {
            ListenerKind::Http => Role::Http,
            ListenerKind::Https => Role::Https,
            ListenerKind::Tcp(p) => Role::Tcp(*p),
        }
    }

    fn kind(&self) -> Option<ListenerKind> {
        match self {
            Role::Admin => None,
            Role::Http => Some(ListenerKind::Http),
            Role::Https => Some(ListenerKind::Https),
            Role::Tcp(p) => Some(ListenerKind::Tcp(*p)),
        }
    }
}

/// One listener as described on the wire: its requested address (what the new node's
/// configuration will ask for), and how many of the message's descriptors are its sockets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Described {
    pub role: Role,
    pub addr: SocketAddr,
    pub count: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Batch {
    listeners: Vec<Described>,
    last: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Request {
    Takeover { pid: u32, version: String },
    Accepting,
}

/// A socket to hand over, borrowed from its owner for the transfer.
pub struct Outgoing<'a> {
    pub role: Role,
    pub addr: SocketAddr,
    pub sockets: Vec<BorrowedFd<'a>>,
}

impl<'a> Outgoing<'a> {
    /// The data plane's listeners, as `DataPlane::export` lists them.
    pub fn from_dataplane(listeners: Vec<crate::dataplane::Exported<'a>>) -> Vec<Outgoing<'a>> {
        listeners.into_iter().map(|l| Outgoing { role: Role::of(&l.kind), addr: l.addr, sockets: l.sockets }).collect()
    }
}

/// Sockets received from the previous process, claimed by role and requested address.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: HashMap<(Role, SocketAddr), Vec<std::net::TcpListener>>,
}

impl Inherited {
    /// The admin listener, when the new node asks for the same address.
    pub fn take_admin(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        self.sockets.remove(&(Role::Admin, addr)).and_then(|mut v| v.pop())
    }

    /// The data plane's sockets, keyed as `DataPlane::inherit` wants them.
    pub fn into_dataplane(self) -> HashMap<(SocketAddr, ListenerKind), Vec<std::net::TcpListener>> {
        self.sockets.into_iter().filter_map(|((role, addr), v)| Some(((addr, role.kind()?), v))).collect()
    }

    pub fn len(&self) -> usize {
        self.sockets.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The new node's side of a takeover in progress.
pub struct Takeover {
    stream: UnixStream,
    pub inherited: Inherited,
}

impl Takeover {
    /// Tells the old node that this one accepts now: it stops accepting and drains.
    pub fn accepting(mut self) -> io::Result<()> {
        send_request(&mut self.stream, &Request::Accepting)
    }
}

/// The path of the upgrade socket of `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Takes over from the node running on `data_dir`, if there is one: `Ok(None)` when nobody
/// listens there (a stale socket file is removed). Blocks until the old node has released
/// the data directory and sent its sockets.
pub fn take_over(data_dir: &Path) -> io::Result<Option<Takeover>> {
    let path = socket_path(data_dir);
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            // Left behind by a process that did not exit cleanly.
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    stream.set_read_timeout(Some(RELEASE_TIMEOUT))?;
    let request = Request::Takeover { pid: std::process::id(), version: env!("CARGO_PKG_VERSION").to_string() };
    send_request(&mut stream, &request)?;
    let inherited = receive_sockets(&stream)?;
    stream.set_read_timeout(None)?;
    Ok(Some(Takeover { stream, inherited }))
}

/// The old node's listening side.
pub struct Offer {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    /// The socket file's inode, to tell it from one a newer process put in its place.
    ino: u64,
}

impl Offer {
    /// Listens on `<data_dir>/upgrade.sock` (replacing a file left there), owner-only. Needs
    /// a tokio runtime.
    pub fn bind(data_dir: &Path) -> io::Result<Offer> {
        use std::os::unix::fs::PermissionsExt;
        let path = socket_path(data_dir);
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path)?);
        Ok(Offer { listener, path, ino })
    }

    /// Waits for a new node asking to take over.
    pub async fn next(&self) -> io::Result<Asked> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let read = tokio::task::spawn_blocking(move || {
                let mut stream = stream;
                let request = read_request(&mut stream);
                (stream, request)
            })
            .await;
            match read {
                Ok((stream, Ok(Request::Takeover { pid, version }))) => {
                    // The new node may take long to become ready; it is bounded there.
                    stream.set_read_timeout(Some(ACCEPTING_TIMEOUT))?;
                    return Ok(Asked { stream, pid, version });
                }
                Ok((_, Ok(other))) => tracing::warn!(?other, "upgrade socket: unexpected request; closed"),
                Ok((_, Err(e))) => tracing::warn!(error = %e, "upgrade socket: unreadable request; closed"),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }

    /// Removes the socket file, if it is still ours (the new node may have replaced it).
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(&self.path).ok().map(|m| m.ino()) == Some(self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A takeover asked by the process `pid`.
pub struct Asked {
    stream: UnixStream,
    pub pid: u32,
    pub version: String,
}

impl Asked {
    /// Sends the sockets (after the control plane has been released).
    pub fn send(&self, sockets: &[Outgoing<'_>]) -> io::Result<()> {
        send_sockets(&self.stream, sockets)
    }

    /// Waits until the new node accepts: true; false when it went away before that (it
    /// failed to start) or took longer than `ACCEPTING_TIMEOUT`.
    pub async fn accepted(mut self) -> bool {
        let read = tokio::task::spawn_blocking(move || read_request(&mut self.stream)).await;
        matches!(read, Ok(Ok(Request::Accepting)))
    }
}

fn send_request(stream: &mut UnixStream, request: &Request) -> io::Result<()> {
    let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// Reads one request line, byte by byte: nothing after it may be consumed.
fn read_request(stream: &mut UnixStream) -> io::Result<Request> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
        line.push(byte[0]);
    }
    Err(invalid("request line too long".into()))
}

/// Sends `sockets` in batches of at most `FDS_PER_MESSAGE` descriptors.
fn send_sockets(stream: &UnixStream, sockets: &[Outgoing<'_>]) -> io::Result<()> {
    let mut batch: Vec<Described> = Vec::new();
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    for s in sockets {
        for chunk in s.sockets.chunks(FDS_PER_MESSAGE) {
            if fds.len() + chunk.len() > FDS_PER_MESSAGE {
                send_batch(stream, &Batch { listeners: std::mem::take(&mut batch), last: false }, &fds)?;
                fds.clear();
            }
            batch.push(Described { role: s.role.clone(), addr: s.addr, count: chunk.len() });
            fds.extend_from_slice(chunk);
        }
    }
    send_batch(stream, &Batch { listeners: batch, last: true }, &fds)
}

fn send_batch(stream: &UnixStream, batch: &Batch, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let body = serde_json::to_vec(batch).map_err(io::Error::other)?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    // The descriptors travel with the first byte; the rest may follow in plain writes.
    let sent = rustix::net::sendmsg(stream, &[IoSlice::new(&frame)], &mut control, SendFlags::empty())?;
    (&*stream).write_all(&frame[sent..])
}

fn receive_sockets(stream: &UnixStream) -> io::Result<Inherited> {
    let mut inherited = Inherited::default();
    loop {
        let (batch, fds) = receive_batch(stream)?;
        let wanted: usize = batch.listeners.iter().map(|d| d.count).sum();
        if wanted != fds.len() {
            return Err(invalid(format!("{} descriptors described, {} received", wanted, fds.len())));
        }
        let mut fds = fds.into_iter();
        for d in batch.listeners {
            let sockets = fds.by_ref().take(d.count).map(std::net::TcpListener::from);
            inherited.sockets.entry((d.role, d.addr)).or_default().extend(sockets);
        }
        if batch.last {
            return Ok(inherited);
        }
    }
}

fn receive_batch(stream: &UnixStream) -> io::Result<(Batch, Vec<OwnedFd>)> {
    let mut len = [0u8; 4];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(stream, &mut [IoSliceMut::new(&mut len)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(invalid("descriptors truncated".into()));
    }
    if got.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    (&*stream).read_exact(&mut len[got.bytes..])?;
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_MESSAGE {
        return Err(invalid(format!("message of {n} bytes")));
    }
    let mut body = vec![0u8; n];
    (&*stream).read_exact(&mut body)?;
    let batch = serde_json::from_slice(&body).map_err(|e| invalid(e.to_string()))?;
    Ok((batch, fds))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("upgrade socket: {msg}"))
}

/// Tells systemd (`Type=notify`), when it supervises this process, that `READY=1` or which
/// process is now the service's main one (`MAINPID=`, after a takeover).
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let path = path.to_string_lossy().into_owned();
    let sent = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|addr| std::os::unix::net::UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr))
    } else {
        std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.send_to(state.as_bytes(), &path))
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn listener() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sockets_cross_with_their_roles_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let offer = Offer::bind(dir.path()).unwrap();
        // More sockets than one message carries, so batching is exercised.
        let first = listener();
        let http: Vec<_> = (0..FDS_PER_MESSAGE + 3).map(|_| first.try_clone().unwrap()).collect();
        let admin = listener();
        let http_port = first.local_addr().unwrap().port();
        let admin_addr: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let http_addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let path = dir.path().to_path_buf();
        let client = std::thread::spawn(move || take_over(&path).unwrap().unwrap());
        let asked = offer.next().await.unwrap();
        assert_eq!(asked.pid, std::process::id());
        let out = vec![
            Outgoing { role: Role::Http, addr: http_addr, sockets: http.iter().map(|s| s.as_fd()).collect() },
            Outgoing { role: Role::Admin, addr: admin_addr, sockets: vec![admin.as_fd()] },
        ];
        asked.send(&out).unwrap();
        let mut takeover = client.join().unwrap();
        assert_eq!(takeover.inherited.len(), FDS_PER_MESSAGE + 4);
        let got_admin = takeover.inherited.take_admin(admin_addr).unwrap();
        assert_eq!(got_admin.local_addr().unwrap(), admin.local_addr().unwrap());
        let dp = std::mem::take(&mut takeover.inherited).into_dataplane();
        let got_http = &dp[&(http_addr, ListenerKind::Http)];
        assert_eq!(got_http.len(), FDS_PER_MESSAGE + 3);
        assert!(got_http.iter().all(|s| s.local_addr().unwrap().port() == http_port));
        // A connection queued on the old socket is accepted through a received one, after
        // the sender closed all of its copies.
        let c = std::net::TcpStream::connect(("127.0.0.1", http_port)).unwrap();
        drop(out);
        drop((first, http));
        let (_accepted, peer) = got_http[7].accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let waiting = tokio::spawn(asked.accepted());
        takeover.accepting().unwrap();
        assert!(waiting.await.unwrap());
    }

    #[test]
    fn no_running_node_means_no_takeover_and_a_stale_socket_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(take_over(dir.path()).unwrap().is_none());
        let stale = std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap();
        drop(stale); // the file stays, nobody listens
        assert!(take_over(dir.path()).unwrap().is_none());
        assert!(!socket_path(dir.path()).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_node_that_dies_before_accepting_is_noticed_and_junk_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let offer = Offer::bind(dir.path()).unwrap();
        let path = dir.path().to_path_buf();
        let junk = socket_path(&path);
        let client = std::thread::spawn(move || {
            // A stranger's line is refused without disturbing the next caller.
            std::os::unix::net::UnixStream::connect(&junk).unwrap().write_all(b"hello\n").unwrap();
            drop(take_over(&path).unwrap().unwrap());
        });
        let asked = offer.next().await.unwrap();
        asked.send(&[]).unwrap();
        client.join().unwrap();
        assert!(!asked.accepted().await);
    }
}
