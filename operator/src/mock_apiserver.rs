//! A tower-test mock apiserver for reconciler tests (the kube-rs controller-rs pattern): the
//! reconciler talks to a real `kube::Client` whose transport is a `tower_test::mock` pair, and
//! the test answers each request after asserting its method, path, query and body. Nothing is
//! faked beyond the apiserver's side of the wire; the ledger, when a branch needs it, is real.
//!
//! Built for this crate's unit tests and, with the `mock-apiserver` feature, for e2e tests that
//! pair it with a real ledger.

use crate::Context;
use crate::metrics::Metrics;
pub use http::{Method, StatusCode};
use http::{Request, Response};
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use spendguard_proto::ledger::v1::ledger_client::LedgerClient;
use std::sync::Arc;
use std::time::Duration;
use tower_test::mock::{Handle, SendResponse};

/// How long [`ApiServer::expect_no_request`] waits for a request that should not come.
const QUIET_PERIOD: Duration = Duration::from_millis(200);

/// One request the reconciler sent.
#[derive(Debug)]
pub struct Received {
    /// HTTP method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// Query string (empty when none).
    pub query: String,
    /// `Content-Type`, when set.
    pub content_type: Option<String>,
    /// Body as JSON (`Null` when empty).
    pub body: Value,
    respond: SendResponse<Response<Body>>,
}

impl Received {
    /// Answers with `status` and the JSON `body`.
    pub fn respond(self, status: StatusCode, body: &Value) {
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).expect("json encodes")))
            .expect("valid response");
        self.respond.send_response(response);
    }

    /// Answers 404 with a `Status`, as the apiserver does for a missing object.
    pub fn not_found(self) {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "not found", "reason": "NotFound", "code": 404,
        });
        self.respond(StatusCode::NOT_FOUND, &status);
    }

    /// Asserts the query holds every `key=value` in `pairs`.
    pub fn assert_query(&self, pairs: &[&str]) {
        let parts: Vec<&str> = self.query.split('&').collect();
        for pair in pairs {
            assert!(
                parts.contains(pair),
                "{pair} missing from query {}",
                self.query
            );
        }
    }
}

/// The test's side of the wire.
pub struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
}

/// A reconciler context on a mock apiserver, with its metrics registry. `ledger` is used as is:
/// pass a real ledger's client when the branch under test reaches the ledger.
pub fn context(
    ledger: LedgerClient<tonic::transport::Channel>,
) -> (Arc<Context>, ApiServer, Registry) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let kube = kube::Client::new(service, "default");
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let context = Context::new(kube, ledger, metrics, "test-operator");
    (Arc::new(context), ApiServer { handle }, registry)
}

/// A ledger client for branches that must not reach the ledger: its lazy channel points at a
/// port nothing listens on, so a call would surface as `LedgerUnavailable` and fail the test's
/// expectations.
pub fn unreachable_ledger() -> LedgerClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    LedgerClient::new(channel)
}

impl ApiServer {
    /// The next request; fails the test if it is not `method` on `path`.
    pub async fn expect(&mut self, method: Method, path: &str) -> Received {
        let (request, respond) =
            tokio::time::timeout(Duration::from_secs(10), self.handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
                .unwrap_or_else(|| panic!("client gone; expected {method} {path}"));
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.expect("request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("request body is json")
        };
        let received = Received {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            content_type: parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body,
            respond,
        };
        assert_eq!(
            (&received.method, received.path.as_str()),
            (&method, path),
            "unexpected request {received:?}"
        );
        received
    }

    /// Asserts a server-side apply of `path` by the operator's field manager, answers with
    /// `object` updated by the applied fields (as the apiserver would), and returns the applied
    /// body.
    pub async fn expect_apply(&mut self, path: &str, object: &Value) -> Value {
        let request = self.expect(Method::PATCH, path).await;
        assert_eq!(
            request.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        request.assert_query(&["fieldManager=spendguard-operator", "force=true"]);
        let body = request.body.clone();
        let mut answer = object.clone();
        for (key, value) in body.as_object().expect("apply body is an object") {
            if key != "metadata" {
                answer[key] = value.clone();
            }
        }
        request.respond(StatusCode::OK, &answer);
        body
    }

    /// Asserts an events.k8s.io/v1 Event in `namespace`, answers it, and returns it.
    pub async fn expect_event(&mut self, namespace: &str) -> Value {
        let path = format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events");
        let request = self.expect(Method::POST, &path).await;
        let body = request.body.clone();
        assert_eq!(body["reportingController"], "spendguard-operator");
        assert_eq!(body["reportingInstance"], "test-operator");
        assert_eq!(body["action"], "Reconcile");
        request.respond(StatusCode::CREATED, &body);
        body
    }

    /// Asserts the reconciler sends nothing more for a while.
    pub async fn expect_no_request(&mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(QUIET_PERIOD, self.handle.next_request()).await
        {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

/// The Ready condition in a status body.
pub fn ready_condition(body: &Value) -> &Value {
    body["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .unwrap_or_else(|| panic!("no Ready condition in {body}"))
}
