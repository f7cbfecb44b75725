//! Withdrawing work whose client has closed its connection. actix-web runs a handler to its end
//! even when the client has gone (actix/actix-web#3462), so a request queued for inference
//! would still be computed for nobody. Each connection's socket is duplicated when it opens;
//! a handler waiting on inference watches it, and when the client has closed it (end of
//! stream, or a reset) the handler's requests that no session has taken yet are withdrawn from
//! the batcher's queues (`linescan_inference_request_failure_total{reason="cancelled"}`, logged
//! with nginx's 499); those already running finish and are answered as usual. Only handlers
//! without side effects are watched, never uploads or writes.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpRequest;
use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::engine::withdraw::{self, Withdrawal};

/// Work that ends sooner is never watched: watching costs two system calls, and leaving it to
/// finish costs less than that. Requests that wait in a queue behind others are the ones worth
/// withdrawing.
const WATCH_AFTER: Duration = Duration::from_millis(5);

/// The connection's socket, duplicated, kept in the connection's data. Closed with the
/// connection's data, or when the last request watching it ends.
#[derive(Clone)]
struct ClientSocket(Arc<OwnedFd>);

/// Run as each connection opens: keeps a duplicate of its socket.
pub fn remember_socket(stream: &TcpStream, data: &mut Extensions) {
    match stream.as_fd().try_clone_to_owned() {
        Ok(socket) => {
            data.insert(ClientSocket(Arc::new(socket)));
        }
        // Out of descriptors: this connection's requests are simply not watched.
        Err(error) => tracing::debug!(%error, "cannot duplicate a client socket"),
    }
}

/// Runs `work`, withdrawing its queued inference requests if the client of `request` closes its
/// connection meanwhile (they then fail with `InferError::Cancelled`).
pub async fn unless_client_leaves<F: Future>(request: &HttpRequest, work: F) -> F::Output {
    let Some(socket) = request.conn_data::<ClientSocket>().cloned() else {
        return work.await;
    };
    let withdrawal = Arc::new(Withdrawal::default());
    let mut work = std::pin::pin!(withdraw::scope(withdrawal.clone(), work));
    tokio::select! {
        biased;
        output = &mut work => return output,
        () = tokio::time::sleep(WATCH_AFTER) => {}
    }
    tokio::select! {
        biased;
        output = &mut work => return output,
        () = closed_by_client(socket.0) => withdrawal.give(),
    }
    work.await
}

/// Ends when the client has closed the socket; pending for ever when it has not, or when that
/// cannot be told (bytes of a next request are waiting, or the socket cannot be watched).
async fn closed_by_client(socket: Arc<OwnedFd>) {
    // SAFETY: the AsyncFd owns an Arc of the OwnedFd, which stays open, and is the same
    // descriptor, for as long as the AsyncFd lives.
    let registered = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) };
    let Ok(watched) = registered else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut ready) = watched.readable().await else {
            return std::future::pending().await;
        };
        match peek(watched.get_ref()) {
            Peeked::Closed => return,
            Peeked::Data => return std::future::pending().await,
            Peeked::Nothing => ready.clear_ready(),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Peeked {
    /// End of stream or an error (a reset): the client is gone.
    Closed,
    /// Bytes wait to be read (a pipelined request): the client is there.
    Data,
    /// Nothing to read yet.
    Nothing,
}

/// Looks at the socket without taking anything from it (the connection's own reads are left
/// as they were).
fn peek(socket: &OwnedFd) -> Peeked {
    let mut byte = 0u8;
    // SAFETY: one byte into a valid buffer, on a descriptor this process owns.
    let read = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match read {
        0 => Peeked::Closed,
        n if n > 0 => Peeked::Data,
        _ => match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Peeked::Nothing,
            _ => Peeked::Closed,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    fn connected() -> (TcpStream, OwnedFd) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, OwnedFd::from(server))
    }

    #[test]
    fn a_peek_tells_a_closed_client_from_a_waiting_or_sending_one() {
        let (mut client, server) = connected();
        assert_eq!(peek(&server), Peeked::Nothing);
        client.write_all(b"G").unwrap();
        assert_eq!(peek(&server), Peeked::Data);
        // The byte is still there for the connection's own read.
        assert_eq!(peek(&server), Peeked::Data);
        let (client, server) = connected();
        drop(client);
        assert_eq!(peek(&server), Peeked::Closed);
    }

    #[tokio::test]
    async fn watching_ends_when_the_client_closes_and_not_before() {
        let (client, server) = connected();
        let server = Arc::new(server);
        let watch = tokio::spawn(closed_by_client(server.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!watch.is_finished());
        drop(client);
        tokio::time::timeout(Duration::from_secs(10), watch)
            .await
            .expect("seen closed")
            .unwrap();
    }
}
