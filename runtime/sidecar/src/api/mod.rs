//! The decision API, over HTTP/JSON (`/v1/spendguard/…`) and gRPC (`spendguard.sidecar.v1`).
//! Both are thin: parsing and mapping around [`crate::decider::Decider`].

pub mod grpc;
pub mod http;

use crate::decider::Spend;
use crate::error::SidecarError;
use crate::proxy::request::Api;
use crate::proxy::usage;
use spendguard_core::pricing::Provider;

/// Parses a provider name.
///
/// # Errors
/// [`SidecarError::InvalidArgument`] for anything but `openai` or `anthropic`.
pub fn parse_provider(name: &str) -> Result<Provider, SidecarError> {
    match name {
        "openai" => Ok(Provider::Openai),
        "anthropic" => Ok(Provider::Anthropic),
        _ => Err(SidecarError::invalid(
            "provider",
            "must be \"openai\" or \"anthropic\"",
        )),
    }
}

/// Parses a provider `usage` object of the given format.
///
/// # Errors
/// [`SidecarError::InvalidArgument`] for an unknown format, [`SidecarError::UsageInvalid`] for
/// a usage object that does not have the provider's shape.
pub fn parse_usage(format: &str, usage: &serde_json::Value) -> Result<Spend, SidecarError> {
    let api = match format {
        "openai_chat" => Api::OpenAiChat,
        "openai_responses" => Api::OpenAiResponses,
        "anthropic" => Api::AnthropicMessages,
        _ => {
            return Err(SidecarError::invalid(
                "usage_format",
                "must be openai_chat, openai_responses or anthropic",
            ));
        }
    };
    let serde_json::Value::Object(map) = usage else {
        return Err(SidecarError::UsageInvalid("usage must be an object".into()));
    };
    usage::to_tokens(api, map)
        .map(Spend::Usage)
        .map_err(|e| SidecarError::UsageInvalid(e.to_string()))
}
