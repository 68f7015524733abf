//! A ledger as a release before CheckFencing answers: the real ledger behind a gRPC front that
//! forwards every RPC unchanged except CheckFencing, which it answers as tonic answers a method
//! its server does not have (`UNIMPLEMENTED`, trailers only). No other behaviour is imitated.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};

const CHECK_FENCING: &str = "/spendguard.ledger.v1.Ledger/CheckFencing";

#[derive(Clone)]
struct Front {
    ledger: Channel,
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
        Box::pin(async move {
            if request.uri().path() == CHECK_FENCING {
                return Ok(tonic::Status::unimplemented("").into_http());
            }
            let forwarded = async {
                std::future::poll_fn(|cx| ledger.poll_ready(cx)).await?;
                ledger.call(request).await
            };
            Ok(forwarded
                .await
                .unwrap_or_else(|e| tonic::Status::unavailable(e.to_string()).into_http()))
        })
    }
}

/// Serves the front of the ledger at `ledger` on a new loopback address, until the test ends.
pub async fn start(ledger: std::net::SocketAddr) -> std::net::SocketAddr {
    let channel = Endpoint::from_shared(format!("http://{ledger}"))
        .unwrap()
        .connect_lazy();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Front { ledger: channel })
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}
