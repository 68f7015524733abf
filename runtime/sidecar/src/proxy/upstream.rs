//! The upstream providers: one pooled HTTP client (HTTPS with the system's roots, or plain HTTP
//! for local endpoints), base URLs and optional keys from configuration.
//!
//! The app's own credentials pass through unless a key is configured for the provider; neither
//! is ever logged.

use super::request::Api;
use crate::error::SidecarError;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Uri, header};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{HttpConnector, capture_connection};
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Where each provider lives.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// OpenAI origin, e.g. `https://api.openai.com` (no `/v1`).
    pub openai_base_url: String,
    /// Anthropic origin, e.g. `https://api.anthropic.com`.
    pub anthropic_base_url: String,
    /// Replaces the app's `Authorization` for OpenAI when set (see [`openai_authorization`]).
    pub openai_authorization: Option<HeaderValue>,
    /// Replaces the app's `x-api-key` for Anthropic when set (see [`anthropic_api_key`]).
    pub anthropic_api_key: Option<HeaderValue>,
    /// Time allowed until response headers, and between stream chunks.
    pub timeout: Duration,
}

/// The `Authorization` value carrying OpenAI key `key`, marked sensitive: its `Debug` prints
/// `Sensitive`, so no log line can show it, and HTTP/2 never indexes it.
///
/// # Errors
/// The key is not a valid header value.
pub fn openai_authorization(key: &str) -> Result<HeaderValue, SidecarError> {
    sensitive(&format!("Bearer {key}"))
}

/// The `x-api-key` value carrying Anthropic key `key`, marked sensitive.
///
/// # Errors
/// The key is not a valid header value.
pub fn anthropic_api_key(key: &str) -> Result<HeaderValue, SidecarError> {
    sensitive(key)
}

fn sensitive(value: &str) -> Result<HeaderValue, SidecarError> {
    let mut value = HeaderValue::from_str(value).map_err(|_| {
        SidecarError::invalid("api_key_file", "the key is not a valid header value")
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The upstream client.
#[derive(Clone)]
pub struct Upstream {
    client: HttpsClient,
    config: std::sync::Arc<UpstreamConfig>,
}

/// Headers that belong to one hop, or that the guard owns.
fn is_forwardable(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "accept-encoding"
    ) && !name.as_str().starts_with("x-spendguard-")
}

/// Longest wait for a connection to the provider (TCP; the upstream timeout when shorter).
const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(10);

/// Whether hyper gave the request back without writing it (the connection closed first).
fn handed_back_unsent(error: &hyper_util::client::legacy::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_canceled)
}

impl Upstream {
    /// Builds the client.
    ///
    /// # Errors
    /// [`SidecarError::Internal`] when the system's root certificates cannot be loaded, or a base
    /// URL does not parse.
    pub fn new(config: UpstreamConfig) -> Result<Self, SidecarError> {
        for base in [&config.openai_base_url, &config.anthropic_base_url] {
            base.parse::<Uri>()
                .map_err(|e| SidecarError::Internal(format!("upstream base URL {base}: {e}")))?;
        }
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        // No Nagle delay on the request path (hyper's default keeps it on).
        tcp.set_nodelay(true);
        // A provider that drops connection attempts is reported as unreachable (nothing sent),
        // not as a call without an answer.
        tcp.set_connect_timeout(Some(config.timeout.min(CONNECT_TIMEOUT_MAX)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| SidecarError::Internal(format!("root certificates: {e}")))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        // Idle connections go before providers' load balancers close them (often at 60 s): a
        // request written into a connection the far end is closing gets no answer, and is then
        // committed at its worst case although nothing processed it.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            config: std::sync::Arc::new(config),
        })
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Sends `body` to the provider of `api`, with the client's headers (minus hop-by-hop ones)
    /// and uncompressed responses (usage must be readable).
    ///
    /// # Errors
    /// [`SidecarError::UpstreamUnavailable`] when nothing reached the provider (no connection, or
    /// the request handed back unsent); [`SidecarError::UpstreamNoAnswer`] when the request went
    /// into a connection and no answer came (a timeout, a connection lost); `Internal` when the
    /// request could not be built (nothing sent).
    pub async fn send(
        &self,
        api: Api,
        query: Option<&str>,
        client_headers: &HeaderMap,
        body: Vec<u8>,
    ) -> Result<hyper::Response<Incoming>, SidecarError> {
        let base = match api {
            Api::OpenAiChat | Api::OpenAiResponses => &self.config.openai_base_url,
            Api::AnthropicMessages => &self.config.anthropic_base_url,
        };
        let mut uri = format!("{}{}", base.trim_end_matches('/'), api.path());
        if let Some(query) = query {
            uri.push('?');
            uri.push_str(query);
        }
        let mut request = Request::post(uri)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SidecarError::Internal(e.to_string()))?;
        let connection = capture_connection(&mut request);
        let headers = request.headers_mut();
        for (name, value) in client_headers {
            if is_forwardable(name) {
                let mut value = value.clone();
                // The app's own key passes through, never into a log.
                if name == header::AUTHORIZATION || name == "x-api-key" {
                    value.set_sensitive(true);
                }
                headers.append(name.clone(), value);
            }
        }
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match api {
            Api::OpenAiChat | Api::OpenAiResponses => {
                if let Some(value) = &self.config.openai_authorization {
                    headers.insert(header::AUTHORIZATION, value.clone());
                }
            }
            Api::AnthropicMessages => {
                if let Some(value) = &self.config.anthropic_api_key {
                    headers.insert("x-api-key", value.clone());
                }
            }
        }
        // Names only, and the path without its query: any header or query parameter may carry a
        // credential (`api-key`, `cookie`, `?key=`), not only the keys marked sensitive above.
        // (Field values are evaluated only when the event is enabled.)
        tracing::trace!(
            path = request.uri().path(),
            headers = ?request.headers().keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            "sending upstream"
        );
        let answer = tokio::time::timeout(self.config.timeout, self.client.request(request)).await;
        // The request reached a connection only once one was handed to it (TCP and TLS up).
        let connected = connection.connection_metadata().is_some();
        match answer {
            Ok(Ok(response)) => Ok(response),
            // The error's Display never includes headers, so credentials cannot leak here.
            Ok(Err(e)) if !connected || e.is_connect() || handed_back_unsent(&e) => {
                Err(SidecarError::UpstreamUnavailable(e.to_string()))
            }
            Ok(Err(e)) => Err(SidecarError::UpstreamNoAnswer(e.to_string())),
            Err(_) if !connected => Err(SidecarError::UpstreamUnavailable(format!(
                "no connection within {:?}",
                self.config.timeout
            ))),
            Err(_) => Err(SidecarError::UpstreamNoAnswer(format!(
                "no response within {:?}",
                self.config.timeout
            ))),
        }
    }
}

/// Response headers passed back to the client.
pub fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in upstream {
        if is_forwardable(name) && name != header::CONTENT_ENCODING {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_keys_never_print() {
        let config = UpstreamConfig {
            openai_base_url: "https://api.openai.com".into(),
            anthropic_base_url: "https://api.anthropic.com".into(),
            openai_authorization: Some(openai_authorization("sk-openai-secret").unwrap()),
            anthropic_api_key: Some(anthropic_api_key("sk-ant-secret").unwrap()),
            timeout: Duration::from_secs(1),
        };
        let printed = format!("{config:?}");
        assert!(!printed.contains("secret"), "{printed}");
        assert!(printed.contains("Sensitive"), "{printed}");
        assert_eq!(
            config.openai_authorization.unwrap().to_str().unwrap(),
            "Bearer sk-openai-secret",
            "still sent as it is"
        );
        assert!(anthropic_api_key("line\nbreak").is_err());
    }
}
