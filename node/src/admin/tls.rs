//! The admin listener behind TLS (`--admin-tls-cert/--admin-tls-key`). ALPN offers `h2` and
//! `http/1.1`, so seed 003's gRPC clients (which need h2 by ALPN) and the CLI (HTTP/1.1) share
//! the port as they share the plain one; hyper's auto builder then serves whichever protocol
//! the client speaks. The certificate is the data plane's reloadable store: a changed file is
//! picked up at the next accepted connection, a broken one keeps the certificate in service.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::dataplane::tls::TlsStore;

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;

/// The store's configuration with the admin ALPN list, rebuilt when the store reloads.
pub struct AdminTls {
    store: Arc<TlsStore>,
    cached: Mutex<Option<(Arc<ServerConfig>, Arc<ServerConfig>)>>,
}

impl AdminTls {
    pub fn new(store: Arc<TlsStore>) -> AdminTls {
        AdminTls { store, cached: Mutex::new(None) }
    }

    /// The configuration for the next handshake (after picking up changed files).
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.store.reload_if_changed() {
            Some(Ok(())) => tracing::info!("admin TLS certificate reloaded"),
            Some(Err(e)) => tracing::warn!(error = %e, "admin TLS certificate not reloaded; the old one stays"),
            None => {}
        }
        let source = self.store.current();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        match cached.as_ref() {
            Some((src, built)) if Arc::ptr_eq(src, &source) => built.clone(),
            _ => {
                let mut config = (*source).clone();
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                let built = Arc::new(config);
                *cached = Some((source, built.clone()));
                built
            }
        }
    }
}

/// Accepts TLS connections on `listener` and serves `app` on each until `stop` resolves.
pub async fn serve(listener: TcpListener, app: Router, tls: AdminTls, stop: impl std::future::Future<Output = ()>) {
    let mut conns = JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept(), if conns.len() < MAX_CONNECTIONS => match accepted {
                Ok((tcp, peer)) => {
                    conns.spawn(serve_one(tcp, peer, tls.config(), app.clone()));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    // Stopped: connections still open are closed (as the plain listener does at this phase).
    conns.shutdown().await;
}

async fn serve_one(tcp: TcpStream, peer: SocketAddr, config: Arc<ServerConfig>, app: Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "admin TLS handshake failed"),
        Err(_) => return tracing::debug!(%peer, "admin TLS handshake timed out"),
    };
    let service = TowerToHyperService::new(app);
    let builder = auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await {
        tracing::debug!(%peer, error = %e, "admin connection ended with an error");
    }
}
