//! The accept loop, with a switch that makes the simulated Nomad unreachable: the listening
//! socket is closed (connections are refused, as for a stopped agent) and every open
//! connection is cut; switching back binds the same address again.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::SimError;
use crate::driver::Shared;
use crate::http;

enum Command {
    Down(oneshot::Sender<()>),
    Up(TcpListener, oneshot::Sender<()>),
}

/// Controls the server task.
#[derive(Debug)]
pub(crate) struct Control {
    commands: mpsc::Sender<Command>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Down(_) => "Down",
            Command::Up(..) => "Up",
        })
    }
}

impl Control {
    pub async fn set_unreachable(
        &self,
        shared: &Shared,
        address: SocketAddr,
        unreachable: bool,
    ) -> Result<(), SimError> {
        let (done, acknowledged) = oneshot::channel();
        let command = if unreachable {
            shared.unreachable.send_replace(true);
            Command::Down(done)
        } else {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| SimError::Listen { address, source })?;
            shared.unreachable.send_replace(false);
            Command::Up(listener, done)
        };
        self.commands.send(command).await.map_err(|_| SimError::ServerGone)?;
        acknowledged.await.map_err(|_| SimError::ServerGone)
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Starts the accept loop on `listener`.
pub(crate) fn start(shared: Arc<Shared>, listener: TcpListener) -> Control {
    let (commands, receiver) = mpsc::channel(4);
    let stop = shared.cancel.child_token();
    let control = Control { commands, stop: stop.clone() };
    shared.tasks.spawn(accept_loop(shared.clone(), listener, receiver, stop));
    control
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut commands: mpsc::Receiver<Command>,
    stop: CancellationToken,
) {
    let router = http::router(shared.clone());
    let mut listener = Some(listener);
    loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = accept => {
                if let Ok((stream, _)) = accepted {
                    shared.tasks.spawn(serve(shared.clone(), router.clone(), stream, stop.clone()));
                }
            }
            command = commands.recv() => match command {
                Some(Command::Down(done)) => {
                    listener = None;
                    let _ = done.send(());
                }
                Some(Command::Up(new, done)) => {
                    listener = Some(new);
                    let _ = done.send(());
                }
                None => return,
            },
            () = stop.cancelled() => return,
        }
    }
}

/// One connection, cut when the server becomes unreachable or stops.
async fn serve(
    shared: Arc<Shared>,
    router: axum::Router,
    stream: TcpStream,
    stop: CancellationToken,
) {
    let mut unreachable = shared.unreachable.subscribe();
    if *unreachable.borrow_and_update() {
        return;
    }
    let service = TowerToHyperService::new(router);
    let builder = Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        _ = unreachable.wait_for(|down| *down) => {}
        () = stop.cancelled() => {}
    }
}
