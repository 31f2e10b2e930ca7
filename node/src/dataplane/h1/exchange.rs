//! One request/response exchange with a backend: the rewritten head and the body the client
//! already sent leave in one write; the rest of the request body streams up while the proxy
//! waits for the response (a backend may answer early); 1xx answers are relayed; the response
//! streams down through its framer. The backend connection goes back to the pool only when
//! both bodies are complete and the connection can carry another request.

use std::borrow::Cow;
use std::io::IoSlice;
use std::sync::Arc;

use tokio::time::Instant;

use super::body::{Framer, Step, drain};
use super::buf::Buf;
use super::client::Client;
use super::emit::{self, LAST_CHUNK, RespPlan, Target, chunk_line};
use super::error::{ProxyError, Reject};
use super::head::{Framing, ReqHead, RespHead, parse_response};
use super::io::{self as hio, Transport, Upstream};
use super::upstream;
use crate::dataplane::DpCtx;
use crate::dataplane::mux::join_path;
use crate::dataplane::reqid::Ids;
use crate::routing::{ActiveGuard, BackendRt, PoolRt};
use crate::shutdown::Phase;

/// Largest response head accepted from a backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// What the client connection does after an exchange.
pub enum Next {
    /// Read the next request (keep-alive).
    Again,
    Close,
    /// The backend switched to WebSocket: relay bytes both ways.
    Tunnel(TunnelStart),
}

/// What a tunnel takes over after a 101.
pub struct TunnelStart {
    pub upstream: Upstream,
    pub backend: Arc<BackendRt>,
    pub guard: ActiveGuard,
    pub pinned: bool,
}

/// The backend this exchange talks to.
pub struct Via<'a> {
    pub backend: &'a Arc<BackendRt>,
    pub pool: &'a PoolRt,
    pub ctx: &'a DpCtx,
    pub conn: Upstream,
    pub reused: bool,
    /// The request id and traceparent the proxy adds.
    pub ids: &'a Ids,
}

/// Sends the request in `c`'s buffer (its head parsed as `head`) to the backend of `via` and
/// relays the answer. Returns the status the client got, and what to do next.
pub async fn run<T: Transport>(
    c: &mut Client<T>,
    head: &ReqHead,
    vm_path: Option<&str>,
    via: Via<'_>,
    guard: ActiveGuard,
    pinned: bool,
) -> Result<(u16, Next), ProxyError> {
    let mut out = Buf::take();
    let src = c.pending();
    let path = vm_path.unwrap_or(head.path(src));
    // `OPTIONS *` asks about the server, not a resource under the backend's path.
    let path = match via.backend.url_path.as_str() {
        _ if path == "*" => Cow::Borrowed(path),
        "" | "/" => Cow::Borrowed(path),
        prefix => Cow::Owned(join_path(prefix, path)),
    };
    let target = Target { path: &path, query: head.query(src) };
    emit::request_head(&mut out, src, head, &target, c.id, &via.backend.key, via.ids);
    c.consume(head.len);
    let mut ex = Exchange::new(c, head, via);
    ex.body_into(&mut out).map_err(ProxyError::Reject)?;
    ex.send_first(out).await?;
    let resp = ex.response_head().await?;
    if resp.status == 101 {
        return ex.switch(resp, guard, pinned).await.map(|next| (101, next));
    }
    let status = resp.status;
    ex.respond(resp).await.map(|next| (status, next))
}

struct Exchange<'a, T> {
    c: &'a mut Client<T>,
    head: &'a ReqHead,
    backend: &'a Arc<BackendRt>,
    pool: &'a PoolRt,
    ctx: &'a DpCtx,
    ids: &'a Ids,
    up: Upstream,
    reused: bool,
    /// Bytes from the backend not yet relayed.
    up_buf: Option<Buf>,
    req: Framer,
    /// The whole request as sent, while a pooled connection that died idle lets it be replayed.
    replay: Option<Buf>,
    /// Nothing has come back from the backend yet.
    silent: bool,
}

impl<'a, T: Transport> Exchange<'a, T> {
    fn new(c: &'a mut Client<T>, head: &'a ReqHead, via: Via<'a>) -> Self {
        Exchange {
            c,
            head,
            backend: via.backend,
            pool: via.pool,
            ctx: via.ctx,
            ids: via.ids,
            up: via.conn,
            reused: via.reused,
            up_buf: None,
            req: Framer::new(head.framing),
            replay: None,
            silent: true,
        }
    }

    /// Moves the request body bytes the client already sent into `out`.
    fn body_into(&mut self, out: &mut Buf) -> Result<(), Reject> {
        let Some(src) = self.c.buf.as_mut() else { return Ok(()) };
        let n = encode(&mut self.req, src, out, self.head.framing == Framing::Chunked)?;
        self.pool.metrics.bytes_in.inc_by(n);
        self.c.consume(0);
        Ok(())
    }

    /// Writes the head (and early body); a pooled connection found dead gets one fresh retry.
    async fn send_first(&mut self, out: Buf) -> Result<(), ProxyError> {
        let written = hio::write_all(&mut self.up, &mut [IoSlice::new(out.bytes())]).await;
        match written {
            Ok(()) => {
                if self.req.done() && self.reused {
                    self.replay = Some(out);
                }
                Ok(())
            }
            Err(_) if self.reused && self.req.done() => {
                self.replay = Some(out);
                self.reconnect().await
            }
            Err(e) => Err(ProxyError::BackendIo(format!("write: {e}"))),
        }
    }

    /// Replaces a pooled connection that died before answering and sends the request again.
    async fn reconnect(&mut self) -> Result<(), ProxyError> {
        let Some(out) = self.replay.take() else {
            return Err(ProxyError::BackendIo("closed before answering".into()));
        };
        self.up = upstream::open(self.backend, self.pool, self.ctx, self.c.addrs())
            .await
            .map_err(|e| ProxyError::BackendIo(e.to_string()))?;
        self.reused = false;
        self.up_buf = None;
        hio::write_all(&mut self.up, &mut [IoSlice::new(out.bytes())])
            .await
            .map_err(|e| ProxyError::BackendIo(format!("write: {e}")))
    }

    /// Waits for the final response head, streaming the request body up meanwhile and relaying
    /// informational answers.
    async fn response_head(&mut self) -> Result<RespHead, ProxyError> {
        let mut deadline = Instant::now() + self.pool.response_timeout;
        loop {
            if let Some(resp) = self.parsed_head()? {
                if !resp.informational() {
                    self.c.response_at = Some(Instant::now());
                    return Ok(resp);
                }
                self.relay_informational(resp).await?;
                continue;
            }
            let event = tokio::select! {
                r = hio::read(&mut self.up, &mut self.up_buf) => Event::Backend(r),
                r = self.c.read(), if !self.req.done() => Event::Client(r),
                _ = tokio::time::sleep_until(deadline) => return Err(ProxyError::BackendTimeout),
            };
            match event {
                Event::Backend(Ok(n)) if n > 0 => self.silent = false,
                Event::Backend(r) => self.backend_closed_early(r.err()).await?,
                Event::Client(r) => {
                    self.upload(r).await?;
                    deadline = Instant::now() + self.pool.response_timeout;
                }
            }
        }
    }

    /// The backend closed (or failed) before a complete head: replay on a fresh connection
    /// when the request can be sent again whole, else fail.
    async fn backend_closed_early(&mut self, err: Option<std::io::Error>) -> Result<(), ProxyError> {
        if self.silent && self.reused && self.replay.is_some() {
            return self.reconnect().await;
        }
        Err(ProxyError::BackendIo(match err {
            Some(e) => format!("read: {e}"),
            None => "closed before a complete response head".into(),
        }))
    }

    fn parsed_head(&mut self) -> Result<Option<RespHead>, ProxyError> {
        let Some(buf) = self.up_buf.as_ref().filter(|b| !b.is_empty()) else { return Ok(None) };
        match parse_response(buf.bytes(), self.head.method, MAX_RESPONSE_HEAD) {
            Ok(h) => Ok(h),
            Err(e) => Err(ProxyError::BadResponse(e)),
        }
    }

    async fn relay_informational(&mut self, resp: RespHead) -> Result<(), ProxyError> {
        let mut out = Buf::take();
        let src = self.up_buf.as_ref().map_or(&[][..], Buf::bytes);
        emit::response_head(
            &mut out,
            src,
            &resp,
            RespPlan { chunked: false, keep_alive: true, say_keep_alive: false },
            self.ids,
        );
        self.consume_up(resp.len);
        self.c.send(&out).await.map_err(|_| ProxyError::ClientGone)
    }

    fn consume_up(&mut self, n: usize) {
        if let Some(b) = self.up_buf.as_mut() {
            b.consume(n);
        }
        hio::release(&mut self.up_buf);
    }

    /// Forwards request body bytes the client just sent (`r` is the read's result).
    async fn upload(&mut self, r: std::io::Result<usize>) -> Result<(), ProxyError> {
        if !matches!(r, Ok(n) if n > 0) {
            return Err(ProxyError::ClientGone);
        }
        let mut out = Buf::take();
        self.body_into(&mut out).map_err(ProxyError::Reject)?;
        if out.is_empty() {
            return Ok(());
        }
        hio::write_all(&mut self.up, &mut [IoSlice::new(out.bytes())])
            .await
            .map_err(|e| ProxyError::BackendIo(format!("write: {e}")))
    }

    /// Relays a 101 to a WebSocket upgrade request and hands both connections to a tunnel.
    async fn switch(mut self, resp: RespHead, guard: ActiveGuard, pinned: bool) -> Result<Next, ProxyError> {
        if !self.head.websocket {
            return Err(ProxyError::UnaskedUpgrade);
        }
        let mut out = Buf::take();
        let plan = RespPlan { chunked: false, keep_alive: true, say_keep_alive: false };
        let src = self.up_buf.as_ref().map_or(&[][..], Buf::bytes);
        emit::response_head(&mut out, src, &resp, plan, self.ids);
        // Bytes the backend sent after its 101 belong to the tunnel: the client gets them first.
        out.put(&src[resp.len..]);
        self.up_buf = None;
        self.c.send(&out).await.map_err(|_| ProxyError::ClientGone)?;
        let backend = self.backend.clone();
        Ok(Next::Tunnel(TunnelStart { upstream: self.up, backend, guard, pinned }))
    }

    /// Relays the response head and body; decides whether either connection lives on.
    async fn respond(mut self, resp: RespHead) -> Result<Next, ProxyError> {
        let plan = self.plan(&resp);
        let mut framer = Framer::new(resp.framing);
        let mut out = Buf::take();
        {
            let src = self.up_buf.as_ref().map_or(&[][..], Buf::bytes);
            emit::response_head(&mut out, src, &resp, plan, self.ids);
        }
        self.consume_up(resp.len);
        self.pass_down(Some(&out), &mut framer, plan.chunked).await?;
        drop(out);
        let complete = self.stream_down(&mut framer, plan.chunked).await?;
        let leftover = self.up_buf.as_ref().is_some_and(|b| !b.is_empty());
        // A connection that began with a PROXY header speaks for one client connection only
        // (see `upstream::get`): it is never pooled.
        if reusable(self.req.done(), &resp, complete, leftover) && self.pool.send_proxy.is_none() {
            self.backend.shared.pool.put(self.up);
        }
        Ok(if plan.keep_alive { Next::Again } else { Next::Close })
    }

    fn plan(&self, resp: &RespHead) -> RespPlan {
        let client_11 = self.head.minor == 1;
        let draining = self.ctx.shutdown.phase() >= Phase::Draining;
        let keep_alive = self.head.keep_alive
            && self.req.done()
            && !draining
            && match resp.framing {
                Framing::UntilClose => false,
                Framing::Chunked => client_11,
                Framing::Empty | Framing::Length(_) => true,
            };
        RespPlan { chunked: resp.framing == Framing::Chunked && client_11, keep_alive, say_keep_alive: !client_11 }
    }

    /// Writes `head` (when given) and the response body bytes the backend buffer holds to the
    /// client: payload goes straight from that buffer, with our own chunk lines around it, in
    /// one vectored write per run, so a small response leaves in one system call.
    async fn pass_down(&mut self, head: Option<&Buf>, framer: &mut Framer, chunked: bool) -> Result<(), ProxyError> {
        let mut head = head.map(Buf::bytes);
        loop {
            let src = self.up_buf.as_ref().map_or(&[][..], Buf::bytes);
            let was_done = framer.done();
            let step = if src.is_empty() || was_done {
                Step { used: 0, data: None }
            } else {
                framer.feed(src).map_err(|_| match head {
                    Some(_) => ProxyError::BadResponse("malformed chunked response body"),
                    None => ProxyError::Truncated("malformed chunked response body".into()),
                })?
            };
            let data = step.data.clone().map_or(&[][..], |r| &src[r]);
            let (line, n) = chunk_line(data.len());
            let framed = chunked && !data.is_empty();
            let last: &[u8] = if chunked && framer.done() && !was_done { LAST_CHUNK } else { &[] };
            let mut parts = [
                IoSlice::new(head.take().unwrap_or(&[])),
                IoSlice::new(if framed { &line[..n] } else { &[] }),
                IoSlice::new(data),
                IoSlice::new(if framed { b"\r\n" } else { &[] }),
                IoSlice::new(last),
            ];
            if parts.iter().any(|p| !p.is_empty()) {
                self.c.write(&mut parts).await.map_err(|_| ProxyError::ClientGone)?;
            }
            self.pool.metrics.bytes_out.inc_by(data.len() as u64);
            self.consume_up(step.used);
            if step.used == 0 || framer.done() || self.up_buf.is_none() {
                return Ok(());
            }
        }
    }

    /// Streams the rest of the response; true when it ended as framed (or at close, for a
    /// close-delimited body). The request body keeps streaming up meanwhile.
    async fn stream_down(&mut self, framer: &mut Framer, chunked: bool) -> Result<bool, ProxyError> {
        while !framer.done() {
            let event = tokio::select! {
                r = hio::read(&mut self.up, &mut self.up_buf) => Event::Backend(r),
                r = self.c.read(), if !self.req.done() => Event::Client(r),
            };
            match event {
                Event::Backend(Ok(n)) if n > 0 => {}
                Event::Backend(_) if *framer == Framer::UntilClose => return Ok(true),
                Event::Backend(r) => {
                    let why = r.err().map_or("closed mid-body".to_string(), |e| e.to_string());
                    return Err(ProxyError::Truncated(why));
                }
                Event::Client(r) => {
                    self.upload(r).await?;
                    continue;
                }
            }
            self.pass_down(None, framer, chunked).await?;
        }
        Ok(true)
    }
}

enum Event {
    Backend(std::io::Result<usize>),
    Client(std::io::Result<usize>),
}

/// Moves body bytes from `src` through `framer` into `out` (chunk lines of our own when
/// `chunked`, the last chunk once the body ends); returns the payload bytes.
fn encode(framer: &mut Framer, src: &mut Buf, out: &mut Buf, chunked: bool) -> Result<u64, Reject> {
    if framer.done() {
        return Ok(0);
    }
    let mut n = 0u64;
    let used = drain(framer, src.bytes(), |d| {
        n += d.len() as u64;
        if chunked {
            let (line, len) = chunk_line(d.len());
            out.put(&line[..len]);
            out.put(d);
            out.put(b"\r\n");
        } else {
            out.put(d);
        }
    })?;
    src.consume(used);
    if chunked && framer.done() {
        out.put(LAST_CHUNK);
    }
    Ok(n)
}

/// A backend connection carries another request only when both bodies ended as framed, the
/// backend keeps it alive, and it sent nothing past its response.
pub fn reusable(request_done: bool, resp: &RespHead, complete: bool, leftover: bool) -> bool {
    request_done
        && complete
        && resp.keep_alive
        && resp.status != 101
        && !leftover
        && matches!(resp.framing, Framing::Empty | Framing::Length(_) | Framing::Chunked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::h1::head::Method;

    fn resp(raw: &str) -> RespHead {
        parse_response(raw.as_bytes(), Method::Get, 8192).expect("valid").expect("complete")
    }

    #[test]
    fn reuse_needs_both_bodies_complete() {
        let ok = resp("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n");
        assert!(reusable(true, &ok, true, false));
        assert!(!reusable(false, &ok, true, false), "request body still streaming");
        assert!(!reusable(true, &ok, false, false), "response cut short");
        assert!(!reusable(true, &ok, true, true), "bytes past the response");
        assert!(!reusable(
            true,
            &resp("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n"),
            true,
            false
        ));
        assert!(!reusable(true, &resp("HTTP/1.1 200 OK\r\n\r\n"), true, false), "close-delimited");
        assert!(!reusable(true, &resp("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n"), true, false));
        assert!(reusable(
            true,
            &resp("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n"),
            true,
            false
        ));
    }

    #[test]
    fn bodies_are_reencoded_with_our_own_chunk_lines() {
        let mut src = Buf::take();
        src.put(b"3;ext=x\r\nabc\r\n0\r\nTrailer: t\r\n\r\nNEXT");
        let mut out = Buf::take();
        let mut f = Framer::new(Framing::Chunked);
        assert_eq!(encode(&mut f, &mut src, &mut out, true).expect("valid"), 3);
        assert_eq!(out.bytes(), b"3\r\nabc\r\n0\r\n\r\n");
        assert_eq!(src.bytes(), b"NEXT");
    }
}
