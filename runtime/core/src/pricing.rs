//! Immutable pricing snapshots and exact cost computation from provider-reported usage (S13 identity).
//!
//! A snapshot lists per-token prices per provider and model (with aliases), in integer nano-USD
//! **per million tokens**, so list prices such as $0.15/M are exact integers. Its identity is the
//! sha256 of its RFC 8785 canonical JSON: the same prices always give the same id, and the ledger
//! records that id on every reservation.
//!
//! Cost is computed once, exactly, over all token classes and rounded up at the end:
//! `ceil(Σ tokens × price_per_million / 10^6)` nano-USD.
//!
//! Provider token accounting (shared/research/ledger-audit-providers.md §6–7):
//! - OpenAI: `cached_tokens` and `cache_write_tokens` are *subsets* of prompt/input tokens, and
//!   `reasoning_tokens` a subset of completion/output tokens.
//! - Anthropic: `input_tokens` *excludes* cache reads and writes; `output_tokens` includes thinking.

use crate::audit::EXACT_INTEGER_MAX;
use crate::money::{MoneyError, NanoUsd};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Tokens per pricing unit.
const TOKENS_PER_PRICE_UNIT: u128 = 1_000_000;

/// A model provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// OpenAI (Chat Completions, Responses).
    Openai,
    /// Anthropic (Messages).
    Anthropic,
}

impl Provider {
    /// Name in snapshots and events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
        }
    }
}

/// Prices of one model in nano-USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Uncached input.
    pub input: i64,
    /// Input read from the prompt cache.
    pub cached_input: i64,
    /// Input written to the prompt cache (Anthropic 5-minute writes; OpenAI cache writes).
    pub cache_write: i64,
    /// Input written to the 1-hour prompt cache (Anthropic); defaults to `cache_write`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h: Option<i64>,
    /// Output.
    pub output: i64,
    /// Reasoning output; defaults to `output` (both providers bill reasoning as output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<i64>,
}

/// One priced model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    /// Provider.
    pub provider: Provider,
    /// Canonical model name.
    pub model: String,
    /// Other names that resolve to this entry (e.g. dated snapshots of the model).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Prices.
    pub price: ModelPrice,
}

/// A pricing snapshot as authored (and as stored: canonical JSON of this).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingSnapshot {
    /// Human version name, e.g. `2026-11-01`.
    pub version: String,
    /// When these prices were captured from the providers (RFC 3339). A contract can refuse, or
    /// mark, decisions priced from a snapshot older than it accepts (S22). Left out of the
    /// canonical JSON when absent, so snapshots without it keep their hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<String>,
    /// Priced models.
    pub entries: Vec<PriceEntry>,
}

/// Why a snapshot or a usage report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// The JSON did not parse or had unknown fields.
    #[error("pricing snapshot is malformed: {0}")]
    Malformed(String),
    /// A price was negative, or above 2^53 nano-USD per million tokens: the snapshot's hash is
    /// over RFC 8785 JSON, which prints numbers as doubles, so it could not tell two such prices
    /// apart (and no model costs $9M per million tokens).
    #[error("price of {model} is outside 0..=2^53 nano-USD per million tokens")]
    PriceOutOfRange {
        /// Model.
        model: String,
    },
    /// Two entries claim one name.
    #[error("model name {name} of {provider} appears twice")]
    DuplicateModel {
        /// Provider.
        provider: &'static str,
        /// Name.
        name: String,
    },
    /// The snapshot's hash is not the one expected.
    #[error("pricing snapshot hash {actual} does not match the expected {expected}")]
    HashMismatch {
        /// Expected.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// The model has no price (fail closed).
    #[error("no price for {provider} model {model}")]
    UnknownModel {
        /// Provider.
        provider: &'static str,
        /// Model.
        model: String,
    },
    /// The provider billed the call at a service tier the snapshot has no prices for (OpenAI
    /// `priority` or `scale`): its usage cannot be priced from the snapshot.
    #[error("the call was served at service tier {0:?}, which the pricing snapshot does not price")]
    UnpricedServiceTier(String),
    /// `published_at` is not an RFC 3339 timestamp.
    #[error("pricing snapshot published_at {0:?} is not an RFC 3339 timestamp")]
    PublishedAtInvalid(String),
    /// A contract limits the pricing's age but the snapshot does not say when it was published.
    #[error(
        "contract {contract} limits the age of its pricing, but pricing {pricing} has no published_at"
    )]
    PublishedAtMissing {
        /// Contract version.
        contract: String,
        /// Pricing version.
        pricing: String,
    },
    /// A usage report was internally inconsistent (e.g. more cached than prompt tokens).
    #[error("usage report is inconsistent: {0}")]
    InconsistentUsage(&'static str),
    /// A usage report bills something snapshots have no price for (audio tokens, server-side
    /// tool requests): pricing it as text would under-count, so it is refused.
    #[error("usage report has {0}, which pricing snapshots do not price")]
    UnpricedUsage(&'static str),
    /// The cost overflowed the money bounds.
    #[error("cost out of range: {0}")]
    Money(#[from] MoneyError),
}

/// A validated snapshot with its identity and name index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    snapshot: PricingSnapshot,
    sha256_hex: String,
    index: BTreeMap<(Provider, String), usize>,
    published_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Pricing {
    /// Parses and validates a snapshot.
    ///
    /// # Errors
    /// [`PricingError::Malformed`], [`PricingError::PriceOutOfRange`] or
    /// [`PricingError::DuplicateModel`].
    pub fn from_json(json: &[u8]) -> Result<Self, PricingError> {
        let snapshot: PricingSnapshot =
            serde_json::from_slice(json).map_err(|e| PricingError::Malformed(e.to_string()))?;
        Self::new(snapshot)
    }

    /// Validates a snapshot.
    ///
    /// # Errors
    /// See [`Pricing::from_json`].
    pub fn new(snapshot: PricingSnapshot) -> Result<Self, PricingError> {
        if snapshot.version.is_empty() {
            return Err(PricingError::Malformed("version is empty".into()));
        }
        let published_at = snapshot
            .published_at
            .as_deref()
            .map(|t| {
                chrono::DateTime::parse_from_rfc3339(t)
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .map_err(|_| PricingError::PublishedAtInvalid(t.to_owned()))
            })
            .transpose()?;
        let mut index = BTreeMap::new();
        for (i, entry) in snapshot.entries.iter().enumerate() {
            let p = entry.price;
            let prices = [
                p.input,
                p.cached_input,
                p.cache_write,
                p.output,
                p.cache_write_1h.unwrap_or(0),
                p.reasoning.unwrap_or(0),
            ];
            // At most 2^53, the largest integer an RFC 8785 double holds exactly, so the
            // snapshot's hash tells every two prices apart.
            if prices
                .iter()
                .any(|&v| !u64::try_from(v).is_ok_and(|v| v <= EXACT_INTEGER_MAX))
            {
                return Err(PricingError::PriceOutOfRange {
                    model: entry.model.clone(),
                });
            }
            for name in std::iter::once(&entry.model).chain(&entry.aliases) {
                if index.insert((entry.provider, name.clone()), i).is_some() {
                    return Err(PricingError::DuplicateModel {
                        provider: entry.provider.as_str(),
                        name: name.clone(),
                    });
                }
            }
        }
        let bytes = serde_json_canonicalizer::to_vec(&snapshot)
            .map_err(|e| PricingError::Malformed(e.to_string()))?;
        let sha256_hex = hex::encode(Sha256::digest(&bytes));
        Ok(Self {
            snapshot,
            sha256_hex,
            index,
            published_at,
        })
    }

    /// Like [`Pricing::from_json`], and refuses a snapshot whose hash is not `expected_sha256_hex`.
    ///
    /// # Errors
    /// [`PricingError::HashMismatch`] or any parse error.
    pub fn from_json_verified(
        json: &[u8],
        expected_sha256_hex: &str,
    ) -> Result<Self, PricingError> {
        let pricing = Self::from_json(json)?;
        if pricing.sha256_hex != expected_sha256_hex {
            return Err(PricingError::HashMismatch {
                expected: expected_sha256_hex.to_owned(),
                actual: pricing.sha256_hex,
            });
        }
        Ok(pricing)
    }

    /// Version name.
    pub fn version(&self) -> &str {
        &self.snapshot.version
    }

    /// When the prices were captured, if the snapshot says.
    pub fn published_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.published_at
    }

    /// Lowercase hex sha256 of the canonical JSON: the snapshot's identity.
    pub fn sha256_hex(&self) -> &str {
        &self.sha256_hex
    }

    /// The price of `model` (or an alias).
    ///
    /// # Errors
    /// [`PricingError::UnknownModel`]: callers stop the call (fail closed).
    pub fn price(&self, provider: Provider, model: &str) -> Result<&ModelPrice, PricingError> {
        self.index
            .get(&(provider, model.to_owned()))
            .map(|&i| &self.snapshot.entries[i].price)
            .ok_or_else(|| PricingError::UnknownModel {
                provider: provider.as_str(),
                model: model.to_owned(),
            })
    }
}

/// Usage split into disjoint, separately priced token classes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Input neither read from nor written to a cache.
    pub uncached_input: u64,
    /// Input read from the cache.
    pub cached_input: u64,
    /// Input written to the (5-minute) cache.
    pub cache_write: u64,
    /// Input written to the 1-hour cache.
    pub cache_write_1h: u64,
    /// Output that is not reasoning.
    pub output: u64,
    /// Reasoning output.
    pub reasoning: u64,
}

/// OpenAI Chat Completions `usage` (only the fields that price).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OpenAiChatUsage {
    /// All prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    /// All completion tokens, reasoning included.
    pub completion_tokens: u64,
    /// Prompt breakdown.
    #[serde(default)]
    pub prompt_tokens_details: Option<OpenAiInputDetails>,
    /// Completion breakdown.
    #[serde(default)]
    pub completion_tokens_details: Option<OpenAiOutputDetails>,
}

/// OpenAI Responses `usage`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OpenAiResponsesUsage {
    /// All input tokens, cached ones included.
    pub input_tokens: u64,
    /// All output tokens, reasoning included.
    pub output_tokens: u64,
    /// Input breakdown.
    #[serde(default)]
    pub input_tokens_details: Option<OpenAiInputDetails>,
    /// Output breakdown.
    #[serde(default)]
    pub output_tokens_details: Option<OpenAiOutputDetails>,
}

/// OpenAI input details (subsets of the input total).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct OpenAiInputDetails {
    /// Read from the cache.
    #[serde(default)]
    pub cached_tokens: Option<u64>,
    /// Written to the cache.
    #[serde(default)]
    pub cache_write_tokens: Option<u64>,
    /// Audio (not priced: refused when non-zero).
    #[serde(default)]
    pub audio_tokens: Option<u64>,
}

/// OpenAI output details (subsets of the output total).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct OpenAiOutputDetails {
    /// Reasoning.
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
    /// Audio (not priced: refused when non-zero).
    #[serde(default)]
    pub audio_tokens: Option<u64>,
}

/// Anthropic Messages `usage`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AnthropicUsage {
    /// Input *excluding* cache reads and writes.
    pub input_tokens: u64,
    /// Output, thinking included.
    pub output_tokens: u64,
    /// Cache writes (all TTLs).
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
    /// Cache reads.
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
    /// Cache writes by TTL.
    #[serde(default)]
    pub cache_creation: Option<AnthropicCacheCreation>,
    /// Output breakdown.
    #[serde(default)]
    pub output_tokens_details: Option<AnthropicOutputDetails>,
    /// Server-side tool requests (web search, web fetch), billed per request: not priced,
    /// refused when any is non-zero.
    #[serde(default)]
    pub server_tool_use: Option<BTreeMap<String, serde_json::Value>>,
}

/// Anthropic cache writes by TTL.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct AnthropicCacheCreation {
    /// 5-minute writes.
    #[serde(default)]
    pub ephemeral_5m_input_tokens: Option<u64>,
    /// 1-hour writes.
    #[serde(default)]
    pub ephemeral_1h_input_tokens: Option<u64>,
}

/// Anthropic output breakdown.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct AnthropicOutputDetails {
    /// Thinking (a subset of output).
    #[serde(default)]
    pub thinking_tokens: Option<u64>,
}

fn split(total: u64, parts: &[u64], what: &'static str) -> Result<u64, PricingError> {
    let sum = parts
        .iter()
        .try_fold(0u64, |acc, &p| acc.checked_add(p))
        .ok_or(PricingError::InconsistentUsage(what))?;
    total
        .checked_sub(sum)
        .ok_or(PricingError::InconsistentUsage(what))
}

fn openai(
    input: u64,
    output: u64,
    inputs: Option<OpenAiInputDetails>,
    outputs: Option<OpenAiOutputDetails>,
) -> Result<TokenUsage, PricingError> {
    let inputs = inputs.unwrap_or_default();
    if inputs.audio_tokens.unwrap_or(0) > 0
        || outputs.unwrap_or_default().audio_tokens.unwrap_or(0) > 0
    {
        return Err(PricingError::UnpricedUsage("audio tokens"));
    }
    let cached_input = inputs.cached_tokens.unwrap_or(0);
    let cache_write = inputs.cache_write_tokens.unwrap_or(0);
    let reasoning = outputs.unwrap_or_default().reasoning_tokens.unwrap_or(0);
    Ok(TokenUsage {
        uncached_input: split(
            input,
            &[cached_input, cache_write],
            "cached and cache-write tokens exceed input tokens",
        )?,
        cached_input,
        cache_write,
        cache_write_1h: 0,
        output: split(
            output,
            &[reasoning],
            "reasoning tokens exceed output tokens",
        )?,
        reasoning,
    })
}

impl TokenUsage {
    /// From OpenAI Chat Completions usage (cached and reasoning tokens are subsets).
    ///
    /// # Errors
    /// [`PricingError::InconsistentUsage`] when a subset exceeds its total.
    pub fn from_openai_chat(u: &OpenAiChatUsage) -> Result<Self, PricingError> {
        openai(
            u.prompt_tokens,
            u.completion_tokens,
            u.prompt_tokens_details,
            u.completion_tokens_details,
        )
    }

    /// From OpenAI Responses usage.
    ///
    /// # Errors
    /// [`PricingError::InconsistentUsage`] when a subset exceeds its total.
    pub fn from_openai_responses(u: &OpenAiResponsesUsage) -> Result<Self, PricingError> {
        openai(
            u.input_tokens,
            u.output_tokens,
            u.input_tokens_details,
            u.output_tokens_details,
        )
    }

    /// From Anthropic Messages usage (input excludes cache reads and writes; output includes
    /// thinking). Cache writes without a TTL breakdown are priced as 5-minute writes.
    ///
    /// # Errors
    /// [`PricingError::InconsistentUsage`] when the TTL breakdown exceeds the cache-write total or
    /// thinking exceeds output.
    pub fn from_anthropic(u: &AnthropicUsage) -> Result<Self, PricingError> {
        let mut tool_requests = u.server_tool_use.iter().flat_map(BTreeMap::values);
        if tool_requests.any(|n| n.as_u64().is_none_or(|n| n > 0)) {
            return Err(PricingError::UnpricedUsage("server tool requests"));
        }
        let writes = u.cache_creation_input_tokens.unwrap_or(0);
        let by_ttl = u.cache_creation.unwrap_or_default();
        let write_1h = by_ttl.ephemeral_1h_input_tokens.unwrap_or(0);
        let thinking = u
            .output_tokens_details
            .unwrap_or_default()
            .thinking_tokens
            .unwrap_or(0);
        Ok(Self {
            uncached_input: u.input_tokens,
            cached_input: u.cache_read_input_tokens.unwrap_or(0),
            cache_write: split(
                writes,
                &[write_1h],
                "1-hour cache writes exceed cache writes",
            )?,
            cache_write_1h: write_1h,
            output: split(
                u.output_tokens,
                &[thinking],
                "thinking tokens exceed output tokens",
            )?,
            reasoning: thinking,
        })
    }

    /// Exact cost at `price`, rounded up to a whole nano-USD.
    ///
    /// # Errors
    /// [`PricingError::Money`] when the cost exceeds the money bounds.
    pub fn cost(&self, price: &ModelPrice) -> Result<NanoUsd, PricingError> {
        let rate = |v: i64| u128::try_from(v).unwrap_or(0);
        let terms = [
            (self.uncached_input, rate(price.input)),
            (self.cached_input, rate(price.cached_input)),
            (self.cache_write, rate(price.cache_write)),
            (
                self.cache_write_1h,
                rate(price.cache_write_1h.unwrap_or(price.cache_write)),
            ),
            (self.output, rate(price.output)),
            (
                self.reasoning,
                rate(price.reasoning.unwrap_or(price.output)),
            ),
        ];
        let numerator = terms
            .iter()
            .try_fold(0u128, |acc, &(tokens, rate)| {
                acc.checked_add(u128::from(tokens).checked_mul(rate)?)
            })
            .ok_or(PricingError::Money(MoneyError::TooLarge))?;
        Ok(NanoUsd::from_ratio_ceil(numerator, TOKENS_PER_PRICE_UNIT)?)
    }
}

/// The most a call can cost: every input token at the highest input-side rate and every output
/// token at the highest output-side rate. A reserve of this amount can never be exceeded by a
/// provider bill for a call with at most these token counts.
///
/// # Errors
/// [`PricingError::Money`] when the bound exceeds the money bounds.
pub fn worst_case_cost(
    price: &ModelPrice,
    input_tokens: u64,
    max_output_tokens: u64,
) -> Result<NanoUsd, PricingError> {
    let input_rate = [
        price.input,
        price.cached_input,
        price.cache_write,
        price.cache_write_1h.unwrap_or(0),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let output_rate = price.output.max(price.reasoning.unwrap_or(0));
    let usage = TokenUsage {
        uncached_input: input_tokens,
        output: max_output_tokens,
        ..TokenUsage::default()
    };
    usage.cost(&ModelPrice {
        input: input_rate,
        output: output_rate,
        cached_input: 0,
        cache_write: 0,
        cache_write_1h: None,
        reasoning: None,
    })
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::unwrap_used)]
mod tests {
    use super::*;

    const SNAPSHOT: &str = r#"{
      "version": "2026-11-01",
      "entries": [
        {"provider": "openai", "model": "gpt-5", "aliases": ["gpt-5-2025-08-07"],
         "price": {"input": 1250000000, "cached_input": 125000000, "cache_write": 1250000000, "output": 10000000000}},
        {"provider": "anthropic", "model": "claude-sonnet-4-5",
         "price": {"input": 3000000000, "cached_input": 300000000, "cache_write": 3750000000,
                   "cache_write_1h": 6000000000, "output": 15000000000}}
      ]
    }"#;

    fn pricing() -> Pricing {
        Pricing::from_json(SNAPSHOT.as_bytes()).unwrap()
    }

    #[test]
    fn identity_is_the_hash_of_canonical_json() {
        let a = pricing();
        // Whitespace and key order do not change the identity; a price does.
        let reordered: serde_json::Value = serde_json::from_str(SNAPSHOT).unwrap();
        let b = Pricing::from_json(serde_json::to_string_pretty(&reordered).unwrap().as_bytes())
            .unwrap();
        assert_eq!(a.sha256_hex(), b.sha256_hex());
        assert_eq!(a.sha256_hex().len(), 64);
        let changed = SNAPSHOT.replace("10000000000", "10000000001");
        assert_ne!(
            Pricing::from_json(changed.as_bytes()).unwrap().sha256_hex(),
            a.sha256_hex()
        );
        assert!(Pricing::from_json_verified(SNAPSHOT.as_bytes(), a.sha256_hex()).is_ok());
        let err = Pricing::from_json_verified(changed.as_bytes(), a.sha256_hex()).unwrap_err();
        assert!(matches!(err, PricingError::HashMismatch { .. }));
    }

    #[test]
    fn malformed_snapshots_are_refused() {
        let unknown_field = SNAPSHOT.replace(
            r#""cached_input": 125000000"#,
            r#""cached_input": 125000000, "surprise": 1"#,
        );
        assert!(matches!(
            Pricing::from_json(unknown_field.as_bytes()),
            Err(PricingError::Malformed(_))
        ));
        let float = SNAPSHOT.replace("1250000000,", "1.25e9,");
        assert!(matches!(
            Pricing::from_json(float.as_bytes()),
            Err(PricingError::Malformed(_))
        ));
        let negative = SNAPSHOT.replace("125000000,", "-1,");
        assert!(matches!(
            Pricing::from_json(negative.as_bytes()),
            Err(PricingError::PriceOutOfRange { .. })
        ));
        let at_most = SNAPSHOT.replace("125000000,", "9007199254740992,");
        assert!(Pricing::from_json(at_most.as_bytes()).is_ok());
        let too_large = SNAPSHOT.replace("125000000,", "9007199254740993,");
        assert!(matches!(
            Pricing::from_json(too_large.as_bytes()),
            Err(PricingError::PriceOutOfRange { .. })
        ));
        let duplicate = SNAPSHOT.replace(
            r#""aliases": ["gpt-5-2025-08-07"]"#,
            r#""aliases": ["gpt-5"]"#,
        );
        assert!(matches!(
            Pricing::from_json(duplicate.as_bytes()),
            Err(PricingError::DuplicateModel { .. })
        ));
    }

    #[test]
    fn aliases_resolve_and_unknown_models_fail_closed() {
        let p = pricing();
        assert_eq!(
            p.price(Provider::Openai, "gpt-5-2025-08-07").unwrap(),
            p.price(Provider::Openai, "gpt-5").unwrap()
        );
        assert!(matches!(
            p.price(Provider::Openai, "gpt-9"),
            Err(PricingError::UnknownModel { .. })
        ));
        // Names are per provider.
        assert!(p.price(Provider::Anthropic, "gpt-5").is_err());
    }

    #[test]
    fn openai_chat_cost_prices_cached_and_reasoning_as_subsets() {
        // The documented example: 1200 prompt (1024 cached), 350 completion (200 reasoning).
        let usage: OpenAiChatUsage = serde_json::from_str(
            r#"{"prompt_tokens":1200,"completion_tokens":350,"total_tokens":1550,
                "prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},
                "completion_tokens_details":{"reasoning_tokens":200,"audio_tokens":0,
                  "accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#,
        )
        .unwrap();
        let tokens = TokenUsage::from_openai_chat(&usage).unwrap();
        assert_eq!(
            (
                tokens.uncached_input,
                tokens.cached_input,
                tokens.output,
                tokens.reasoning
            ),
            (176, 1024, 150, 200)
        );
        let cost = tokens
            .cost(pricing().price(Provider::Openai, "gpt-5").unwrap())
            .unwrap();
        // 176×1.25 + 1024×0.125 + 350×10 USD per M tokens = 220 + 128 + 3500 = 3848 nano-USD ×1000.
        assert_eq!(cost.get(), 3_848_000);
    }

    #[test]
    fn openai_responses_cost() {
        let usage: OpenAiResponsesUsage = serde_json::from_str(
            r#"{"input_tokens":1000,"input_tokens_details":{"cached_tokens":400,"cache_write_tokens":100},
                "output_tokens":500,"output_tokens_details":{"reasoning_tokens":300},"total_tokens":1500}"#,
        )
        .unwrap();
        let tokens = TokenUsage::from_openai_responses(&usage).unwrap();
        assert_eq!(
            (
                tokens.uncached_input,
                tokens.cached_input,
                tokens.cache_write
            ),
            (500, 400, 100)
        );
        let cost = tokens
            .cost(pricing().price(Provider::Openai, "gpt-5").unwrap())
            .unwrap();
        // 500×1.25 + 400×0.125 + 100×1.25 + 500×10 = 625 + 50 + 125 + 5000 = 5800 (×1000 nano-USD).
        assert_eq!(cost.get(), 5_800_000);
    }

    #[test]
    fn anthropic_cost_adds_cache_reads_and_writes_to_input() {
        let usage: AnthropicUsage = serde_json::from_str(
            r#"{"input_tokens":42,"cache_creation_input_tokens":1800,"cache_read_input_tokens":12000,
                "cache_creation":{"ephemeral_5m_input_tokens":1500,"ephemeral_1h_input_tokens":300},
                "output_tokens":512,"server_tool_use":{"web_search_requests":0},"service_tier":"standard"}"#,
        )
        .unwrap();
        let tokens = TokenUsage::from_anthropic(&usage).unwrap();
        assert_eq!(
            (
                tokens.uncached_input,
                tokens.cached_input,
                tokens.cache_write,
                tokens.cache_write_1h
            ),
            (42, 12000, 1500, 300)
        );
        let cost = tokens
            .cost(
                pricing()
                    .price(Provider::Anthropic, "claude-sonnet-4-5")
                    .unwrap(),
            )
            .unwrap();
        // 42×3 + 12000×0.3 + 1500×3.75 + 300×6 + 512×15 = 126 + 3600 + 5625 + 1800 + 7680 = 18831.
        assert_eq!(cost.get(), 18_831_000);
    }

    #[test]
    fn cost_rounds_up_once_over_the_sum() {
        // $0.15/M is 150 nano-USD per token: exact, no rounding.
        let list = ModelPrice {
            input: 150_000_000,
            cached_input: 0,
            cache_write: 0,
            cache_write_1h: None,
            output: 600_000_000,
            reasoning: None,
        };
        let one_each = TokenUsage {
            uncached_input: 1,
            output: 1,
            ..TokenUsage::default()
        };
        assert_eq!(one_each.cost(&list).unwrap().get(), 750);
        // 1000 × 333/10^6 + 2000 × 333/10^6 = 0.333 + 0.666 = 0.999 → 1 (rounding each term
        // separately would charge 2).
        let tiny = ModelPrice {
            input: 333,
            output: 333,
            ..list
        };
        let usage = TokenUsage {
            uncached_input: 1000,
            output: 2000,
            ..TokenUsage::default()
        };
        assert_eq!(usage.cost(&tiny).unwrap().get(), 1);
        assert_eq!(TokenUsage::default().cost(&list).unwrap(), NanoUsd::ZERO);
    }

    #[test]
    fn usage_snapshots_cannot_price_is_refused_not_priced_as_text() {
        let chat: OpenAiChatUsage = serde_json::from_str(
            r#"{"prompt_tokens":10,"completion_tokens":5,
                "prompt_tokens_details":{"cached_tokens":0,"audio_tokens":3}}"#,
        )
        .unwrap();
        assert!(matches!(
            TokenUsage::from_openai_chat(&chat),
            Err(PricingError::UnpricedUsage("audio tokens"))
        ));
        let responses: OpenAiResponsesUsage = serde_json::from_str(
            r#"{"input_tokens":10,"output_tokens":5,"output_tokens_details":{"audio_tokens":1}}"#,
        )
        .unwrap();
        assert!(matches!(
            TokenUsage::from_openai_responses(&responses),
            Err(PricingError::UnpricedUsage("audio tokens"))
        ));
        let searched: AnthropicUsage = serde_json::from_str(
            r#"{"input_tokens":10,"output_tokens":5,"server_tool_use":{"web_search_requests":2}}"#,
        )
        .unwrap();
        assert!(matches!(
            TokenUsage::from_anthropic(&searched),
            Err(PricingError::UnpricedUsage("server tool requests"))
        ));
        // Zero counts are what every plain call reports: priced as usual.
        let plain: AnthropicUsage = serde_json::from_str(
            r#"{"input_tokens":10,"output_tokens":5,"server_tool_use":{"web_search_requests":0}}"#,
        )
        .unwrap();
        assert!(TokenUsage::from_anthropic(&plain).is_ok());
    }

    #[test]
    fn inconsistent_usage_is_refused() {
        let usage = OpenAiChatUsage {
            prompt_tokens: 10,
            completion_tokens: 5,
            prompt_tokens_details: Some(OpenAiInputDetails {
                cached_tokens: Some(11),
                ..OpenAiInputDetails::default()
            }),
            completion_tokens_details: None,
        };
        assert!(matches!(
            TokenUsage::from_openai_chat(&usage),
            Err(PricingError::InconsistentUsage(_))
        ));
        let usage = AnthropicUsage {
            input_tokens: 1,
            output_tokens: 5,
            output_tokens_details: Some(AnthropicOutputDetails {
                thinking_tokens: Some(6),
            }),
            ..AnthropicUsage::default()
        };
        assert!(matches!(
            TokenUsage::from_anthropic(&usage),
            Err(PricingError::InconsistentUsage(_))
        ));
    }

    #[test]
    fn worst_case_bounds_every_real_bill() {
        let p = pricing();
        let price = p.price(Provider::Anthropic, "claude-sonnet-4-5").unwrap();
        let bound = worst_case_cost(price, 1_000, 500).unwrap();
        // Any split of at most 1000 input and 500 output tokens costs no more.
        for (uncached, cached, write, write_1h) in [
            (1000, 0, 0, 0),
            (0, 1000, 0, 0),
            (0, 0, 1000, 0),
            (0, 0, 0, 1000),
            (250, 250, 250, 250),
        ] {
            for reasoning in [0, 250, 500] {
                let usage = TokenUsage {
                    uncached_input: uncached,
                    cached_input: cached,
                    cache_write: write,
                    cache_write_1h: write_1h,
                    output: 500 - reasoning,
                    reasoning,
                };
                assert!(usage.cost(price).unwrap() <= bound);
            }
        }
        // 1000 × 6 (1h write rate) + 500 × 15 = 13500 (×1000 nano-USD).
        assert_eq!(bound.get(), 13_500_000);
    }
}
