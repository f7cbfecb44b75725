//! The HTTP listener. actix-web's `App` is served through actix-http on actix-server, as
//! actix-web's `HttpServer` does it, with one difference: the answer to `Expect: 100-continue`
//! is `EarlyRefusal`'s, where `HttpServer` always says `100 Continue` and so has the client
//! send a body that is then refused.

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::time::Duration;

use actix_http::body::MessageBody;
use actix_http::{HttpService, Request, Response};
use actix_server::Server;
use actix_service::{
    IntoServiceFactory, ServiceFactory, ServiceFactoryExt, fn_service, map_config,
};
use actix_web::dev::{AppConfig, Extensions};
use actix_web::rt::net::TcpStream;
use futures_util::future::ready;

use crate::server::client_gone;
use crate::server::early_refusal::EarlyRefusal;

/// Connections waiting to be accepted, per address (`HttpServer`'s default).
const BACKLOG: i32 = 1024;

/// How long a response may take to flush once its request is done (`HttpServer`'s default).
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where to listen, and how.
pub struct ListenOptions<'a> {
    pub host: &'a str,
    pub port: u16,
    /// HTTP worker threads; None for one per core.
    pub workers: Option<usize>,
    /// Seconds a graceful stop waits for requests in flight.
    pub shutdown_timeout: u64,
}

/// Binds every address `host` resolves to and serves `app` there; returns the server (not yet
/// polled) and the bound addresses. Fails when no address could be bound.
pub fn serve_app<F, I, S, B>(
    options: &ListenOptions,
    app: F,
    early: EarlyRefusal,
) -> io::Result<(Server, Vec<SocketAddr>)>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig, Error = actix_web::Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<Response<B>>,
    B: MessageBody + 'static,
{
    let mut builder = Server::build()
        .shutdown_timeout(options.shutdown_timeout)
        // Signals are the server's own (`shutdown::stop_on_signal`).
        .disable_signals();
    if let Some(workers) = options.workers {
        builder = builder.workers(workers);
    }
    let mut addrs = Vec::new();
    for listener in bind((options.host, options.port))? {
        let addr = listener.local_addr()?;
        addrs.push(addr);
        let app = app.clone();
        let early = early.clone();
        let stopping = builder.graceful_shutdown_signal();
        builder = builder.listen(format!("linescan-http-{addr}"), listener, move || {
            let stopping = stopping.clone();
            let early = early.clone();
            let app = app()
                .into_factory()
                .map_err(|error: actix_web::Error| error.error_response());
            HttpService::build()
                // Lets idle keep-alive connections close at once on a graceful stop, as
                // `HttpServer` does.
                .graceful_shutdown_signal(move || {
                    let stopping = stopping.clone();
                    async move { stopping.notified().await }
                })
                .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
                .local_addr(addr)
                .on_connect_ext(|stream: &TcpStream, data: &mut Extensions| {
                    client_gone::remember_socket(stream, data)
                })
                .expect(fn_service(move |request| ready(early.check(request))))
                // No route asks the app's host or scheme (`url_for`, `connection_info`), which
                // is all `AppConfig` holds.
                .finish(map_config(app, |_| AppConfig::default()))
                .tcp()
        })?;
    }
    Ok((builder.run(), addrs))
}

/// A listener on every address `addrs` resolves to (as `HttpServer::bind`): an error only when
/// none could be bound.
fn bind(addrs: impl ToSocketAddrs) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    let mut last_error = None;
    for addr in addrs.to_socket_addrs()? {
        match listen_on(addr) {
            Ok(listener) => listeners.push(listener),
            Err(error) => last_error = Some(error),
        }
    }
    match (listeners.is_empty(), last_error) {
        (false, _) => Ok(listeners),
        (true, Some(error)) => Err(error),
        (true, None) => Err(io::Error::other("the host resolves to no address")),
    }
}

fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // A restarted server binds at once, not after TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}
