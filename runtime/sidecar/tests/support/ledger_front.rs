//! The real ledger behind a gRPC front that forwards every RPC unchanged, except:
//! - CheckFencing, when told otherwise:
//!   - [`CheckFencing::Unimplemented`]: answered as tonic answers a method its server does not
//!     have (`UNIMPLEMENTED`, trailers only): a ledger released before CheckFencing;
//!   - [`CheckFencing::Held`]: forwarded at once, its answer held until the test lets it go: a
//!     check in flight for as long as a test needs, whose read happened when it was sent;
//! - any method the test names in [`Bare`] while it does: answered with that gRPC code and no
//!   SpendGuard error detail (trailers only), without reaching the ledger: what a proxy, a mesh,
//!   an older ledger or a broken transport answers in the ledger's place.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};

const CHECK_FENCING: &str = "/spendguard.ledger.v1.Ledger/CheckFencing";

/// What the front does with CheckFencing.
#[derive(Clone)]
pub enum CheckFencing {
    /// Answers `UNIMPLEMENTED`.
    Unimplemented,
    /// Forwards each check and holds its answer while the gate is closed.
    Held(Arc<Gate>),
}

/// Holds CheckFencing answers while closed; counts the checks.
pub struct Gate {
    open: watch::Sender<bool>,
    /// Checks forwarded.
    pub sent: AtomicUsize,
    /// Answers the ledger gave and the gate holds now.
    held: watch::Sender<usize>,
}

impl Gate {
    /// A closed gate.
    pub fn closed() -> Arc<Self> {
        Arc::new(Self {
            open: watch::Sender::new(false),
            sent: AtomicUsize::new(0),
            held: watch::Sender::new(0),
        })
    }

    /// Waits until the gate holds `n` answers.
    pub async fn holding(&self, n: usize) {
        self.held
            .subscribe()
            .wait_for(|held| *held >= n)
            .await
            .unwrap();
    }

    /// Lets every answer through, now and later.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

/// The request path of the ledger's `method`.
fn path(method: &str) -> String {
    format!("/spendguard.ledger.v1.Ledger/{method}")
}

/// The methods the front answers itself, bare, and with which gRPC code.
#[derive(Default)]
pub struct Bare {
    answers: Mutex<HashMap<String, tonic::Code>>,
    /// How often each method was answered bare.
    given: Mutex<HashMap<String, usize>>,
}

impl Bare {
    /// Answers `method` (`ReserveSet`, `Commit`, ...) with `code` and no detail from now on.
    pub fn answer(&self, method: &str, code: tonic::Code) {
        self.answers.lock().unwrap().insert(path(method), code);
    }

    /// Forwards every method again.
    pub fn forward_all(&self) {
        self.answers.lock().unwrap().clear();
    }

    /// How many times `method` was answered bare so far.
    pub fn given(&self, method: &str) -> usize {
        self.given
            .lock()
            .unwrap()
            .get(&path(method))
            .copied()
            .unwrap_or(0)
    }

    /// Waits until `method` was answered bare at least `n` times.
    pub async fn wait_given(&self, method: &str, n: usize) {
        for _ in 0..400 {
            if self.given(method) >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!(
            "{method} was answered bare {} times, not {n}",
            self.given(method)
        );
    }

    fn code_for(&self, path: &str) -> Option<tonic::Code> {
        let code = self.answers.lock().unwrap().get(path).copied();
        if code.is_some() {
            *self
                .given
                .lock()
                .unwrap()
                .entry(path.to_owned())
                .or_default() += 1;
        }
        code
    }
}

#[derive(Clone)]
struct Front {
    ledger: Channel,
    check_fencing: Option<CheckFencing>,
    bare: Arc<Bare>,
}

impl NamedService for Front {
    const NAME: &'static str = "spendguard.ledger.v1.Ledger";
}

impl Service<http::Request<Body>> for Front {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let mut ledger = self.ledger.clone();
        let check_fencing = self.check_fencing.clone();
        let bare = self.bare.code_for(request.uri().path());
        Box::pin(async move {
            if let Some(code) = bare {
                return Ok(tonic::Status::new(code, "answered by the front").into_http());
            }
            let gate = match (request.uri().path() == CHECK_FENCING, check_fencing) {
                (true, Some(CheckFencing::Unimplemented)) => {
                    return Ok(tonic::Status::unimplemented("").into_http());
                }
                (true, Some(CheckFencing::Held(gate))) => Some(gate),
                _ => None,
            };
            if let Some(gate) = &gate {
                gate.sent.fetch_add(1, Ordering::SeqCst);
            }
            let forwarded = async {
                std::future::poll_fn(|cx| ledger.poll_ready(cx)).await?;
                ledger.call(request).await
            };
            let answer = forwarded
                .await
                .unwrap_or_else(|e| tonic::Status::unavailable(e.to_string()).into_http());
            if let Some(gate) = gate {
                // The answer's body (its message and trailers) arrives with the headers on a
                // loopback connection: holding the response holds the whole answer.
                gate.held.send_modify(|held| *held += 1);
                let mut open = gate.open.subscribe();
                open.wait_for(|open| *open).await.unwrap();
                gate.held.send_modify(|held| *held -= 1);
            }
            Ok(answer)
        })
    }
}

/// Serves a front of the ledger at `ledger` on a new loopback address, until the test ends.
pub async fn start(
    ledger: std::net::SocketAddr,
    check_fencing: Option<CheckFencing>,
    bare: Arc<Bare>,
) -> std::net::SocketAddr {
    let channel = Endpoint::from_shared(format!("http://{ledger}"))
        .unwrap()
        .connect_lazy();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Front {
                ledger: channel,
                check_fencing,
                bare,
            })
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}
