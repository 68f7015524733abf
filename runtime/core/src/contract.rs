//! Contract evaluation: pure decisions for one LLM call (the sidecar's policy, issue 3).
//!
//! ```text
//! call ─► evaluate_call ─► Stop(reason)                       (nothing reserved)
//!                      └─► Planned { reserve, max_output }  ─► ledger ReserveSet
//!                                                               ├─ denied ─► Stop(BUDGET_EXHAUSTED)
//!                                                               └─ balances ─► evaluate_balances
//!                                                                   ├─► Continue
//!                                                                   └─► RequireApproval(SOFT_CAP_REACHED)
//! ```
//!
//! Every decision carries a stable reason code; the caller records it with the contract and
//! pricing versions.

use crate::money::NanoUsd;
use crate::pricing::{Pricing, PricingError, PricingSnapshot, Provider, worst_case_cost};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a contract does with a model that has no price in the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy", deny_unknown_fields)]
pub enum UnknownModelPolicy {
    /// Refuse the call (the default: fail closed).
    Stop,
    /// Reserve this fixed ceiling instead of a priced worst case (explicit opt-in).
    ReserveCeiling {
        /// The amount reserved per call.
        ceiling_nano_usd: NanoUsd,
    },
}

/// What happens when the ledger cannot be reached (S22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailPolicy {
    /// Refuse the call (the default).
    Closed,
    /// Let the call through and mark its evidence `fail_open` (explicit opt-in).
    Open,
}

/// What a contract does with a call priced from a snapshot older than it accepts (S22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StalePricingAction {
    /// Refuse the call, `PRICING_STALE` (the default: fail closed).
    Stop,
    /// Let it be decided as usual, and mark its evidence `pricing_stale` (explicit opt-in).
    Continue,
}

/// The oldest pricing a contract accepts (S22: pricing stale beyond a threshold follows the
/// contract's policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingMaxAge {
    /// Hours since the snapshot's `published_at`, 1 to [`PRICING_MAX_AGE_HOURS_MAX`].
    pub hours: u32,
    /// What happens past it.
    #[serde(default = "default_stale_action")]
    pub on_stale: StalePricingAction,
}

/// How far ahead of the sidecar's clock a snapshot's `published_at` may be and still count as
/// fresh (clock skew between whoever dated the prices and the sidecar).
pub const PUBLISHED_AHEAD_TOLERATED: chrono::Duration = chrono::Duration::hours(1);

/// Ten years: any longer limit is no limit.
pub const PRICING_MAX_AGE_HOURS_MAX: u32 = 87_600;

fn default_stale_action() -> StalePricingAction {
    StalePricingAction::Stop
}

/// A workflow's spending contract, as authored in a ContractBundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    /// Version name recorded with every decision.
    pub version: String,
    /// Models allowed (empty: every priced model).
    #[serde(default)]
    pub allow_models: Vec<String>,
    /// Models refused, checked before the allow list.
    #[serde(default)]
    pub deny_models: Vec<String>,
    /// Largest worst-case cost of a single call.
    #[serde(default)]
    pub max_cost_per_call_nano_usd: Option<NanoUsd>,
    /// Limit of each run's own budget: calls with a run id also reserve against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_run_limit_nano_usd: Option<NanoUsd>,
    /// Output-token cap: set on calls that name none; calls asking for more are refused.
    pub max_output_tokens: u32,
    /// Require approval when a reservation would take a budget past its soft cap.
    #[serde(default = "default_true")]
    pub approval_above_soft_cap: bool,
    /// Unknown-model handling.
    #[serde(default = "default_unknown_model")]
    pub unknown_model: UnknownModelPolicy,
    /// Ledger-unavailable handling.
    #[serde(default = "default_fail_policy")]
    pub fail_policy: FailPolicy,
    /// The oldest pricing accepted (none: any age). Left out of the canonical JSON when absent,
    /// so contracts without it keep their bundle hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing_max_age: Option<PricingMaxAge>,
}

fn default_true() -> bool {
    true
}

fn default_unknown_model() -> UnknownModelPolicy {
    UnknownModelPolicy::Stop
}

fn default_fail_policy() -> FailPolicy {
    FailPolicy::Closed
}

/// Stable reason codes of decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReasonCode {
    /// Within every limit.
    WithinBudget,
    /// The model is on the deny list.
    ModelDenied,
    /// The model is not on a non-empty allow list.
    ModelNotAllowed,
    /// The model has no price and the contract does not allow a ceiling.
    ModelPriceUnknown,
    /// The call asks for more output tokens than the contract allows.
    MaxOutputTokensAboveCap,
    /// The call's worst case exceeds the per-call cap.
    PerCallCapExceeded,
    /// A budget's hard cap would be exceeded (from the ledger).
    BudgetExhausted,
    /// A budget's soft cap would be crossed: a human must approve.
    SoftCapReached,
    /// The pricing snapshot is older than the contract accepts, and the contract stops then.
    PricingStale,
    /// A call that needed approval goes ahead: its approval was approved (S16 resume).
    Approved,
    /// A call that needed approval is refused: its approver denied it.
    ApprovalDenied,
    /// A call that needed approval is refused: nobody decided before the approval expired.
    ApprovalExpired,
}

impl ReasonCode {
    /// The stable string form.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WithinBudget => "WITHIN_BUDGET",
            Self::ModelDenied => "MODEL_DENIED",
            Self::ModelNotAllowed => "MODEL_NOT_ALLOWED",
            Self::ModelPriceUnknown => "MODEL_PRICE_UNKNOWN",
            Self::MaxOutputTokensAboveCap => "MAX_OUTPUT_TOKENS_ABOVE_CAP",
            Self::PerCallCapExceeded => "PER_CALL_CAP_EXCEEDED",
            Self::BudgetExhausted => "BUDGET_EXHAUSTED",
            Self::SoftCapReached => "SOFT_CAP_REACHED",
            Self::PricingStale => "PRICING_STALE",
            Self::Approved => "APPROVED",
            Self::ApprovalDenied => "APPROVAL_DENIED",
            Self::ApprovalExpired => "APPROVAL_EXPIRED",
        }
    }
}

/// A call as the sidecar sees it before forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Provider.
    pub provider: Provider,
    /// Model as requested.
    pub model: String,
    /// An input token count that cannot undercount the real one.
    pub input_tokens_upper_bound: u64,
    /// The client's output-token limit, if it set one. It applies to each choice.
    pub max_output_tokens: Option<u32>,
    /// Completions generated for the one input (OpenAI chat `n`), at least 1: the input is billed
    /// once, the output of every choice.
    pub choices: u32,
}

/// Most completions one call may ask for (OpenAI accepts `n` up to 128).
pub const CHOICES_MAX: u32 = 128;

/// A call that may proceed to the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// Worst case to reserve.
    pub reserve: NanoUsd,
    /// Output-token limit to enforce on the upstream request (per choice).
    pub max_output_tokens: u32,
}

/// A refusal before anything is reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    /// Why.
    pub reason: ReasonCode,
    /// Human detail.
    pub detail: String,
}

/// Decides whether `call` may be reserved under `contract`, and for how much.
///
/// # Errors
/// A [`Stop`] with its reason; nothing is reserved.
pub fn evaluate_call(contract: &Contract, pricing: &Pricing, call: &Call) -> Result<Planned, Stop> {
    let stop = |reason, detail: String| Stop { reason, detail };
    if contract.deny_models.contains(&call.model) {
        return Err(stop(
            ReasonCode::ModelDenied,
            format!(
                "model {} is denied by contract {}",
                call.model, contract.version
            ),
        ));
    }
    if !contract.allow_models.is_empty() && !contract.allow_models.contains(&call.model) {
        return Err(stop(
            ReasonCode::ModelNotAllowed,
            format!(
                "model {} is not allowed by contract {}",
                call.model, contract.version
            ),
        ));
    }
    let max_output_tokens = match call.max_output_tokens {
        None => contract.max_output_tokens,
        Some(asked) if asked <= contract.max_output_tokens => asked,
        Some(asked) => {
            return Err(stop(
                ReasonCode::MaxOutputTokensAboveCap,
                format!(
                    "max output tokens {asked} exceeds the contract cap of {}",
                    contract.max_output_tokens
                ),
            ));
        }
    };
    // Callers check the range; a value out of it must not shrink the bound.
    let choices = call.choices.clamp(1, CHOICES_MAX);
    let reserve = match pricing.price(call.provider, &call.model) {
        Ok(price) => worst_case_cost(
            price,
            call.input_tokens_upper_bound,
            // At most 2^32 × 128: no overflow in u64.
            u64::from(max_output_tokens).saturating_mul(u64::from(choices)),
        )
        .map_err(|e| stop(ReasonCode::PerCallCapExceeded, e.to_string()))?,
        Err(PricingError::UnknownModel { .. }) => match contract.unknown_model {
            UnknownModelPolicy::Stop => {
                return Err(stop(
                    ReasonCode::ModelPriceUnknown,
                    format!(
                        "no price for {} in pricing {}",
                        call.model,
                        pricing.version()
                    ),
                ));
            }
            // The ceiling stands for one completion; each choice is another.
            UnknownModelPolicy::ReserveCeiling { ceiling_nano_usd } => NanoUsd::from_ratio_ceil(
                u128::from(ceiling_nano_usd.get().unsigned_abs())
                    .saturating_mul(u128::from(choices)),
                1,
            )
            .map_err(|e| stop(ReasonCode::PerCallCapExceeded, e.to_string()))?,
        },
        Err(e) => return Err(stop(ReasonCode::ModelPriceUnknown, e.to_string())),
    };
    if let Some(cap) = contract.max_cost_per_call_nano_usd
        && reserve > cap
    {
        return Err(stop(
            ReasonCode::PerCallCapExceeded,
            format!("worst case {reserve} exceeds the per-call cap of {cap}"),
        ));
    }
    Ok(Planned {
        reserve,
        max_output_tokens,
    })
}

/// How old a call's pricing is, against its contract's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PricingAge {
    /// Within the limit, or the contract sets none.
    Fresh,
    /// Past the limit, and the contract continues: the decision's evidence says so.
    Stale,
}

/// Judges the snapshot's age at `now` against the contract's `pricing_max_age` (S22). A
/// snapshot published up to [`PUBLISHED_AHEAD_TOLERATED`] after `now` (clock skew) is fresh;
/// one dated further ahead is stale, or a typo in its date would switch the limit off for
/// years. One without `published_at` under a contract that limits the age is stale (bundles
/// are refused at load for that, see [`Bundle::from_json_verified`]; this is the fail-closed
/// backstop).
///
/// # Errors
/// A [`Stop`] with `PRICING_STALE` when the snapshot is too old and the contract stops then.
pub fn pricing_age(
    contract: &Contract,
    pricing: &Pricing,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<PricingAge, Stop> {
    let Some(limit) = contract.pricing_max_age else {
        return Ok(PricingAge::Fresh);
    };
    let age_limit = chrono::Duration::hours(i64::from(limit.hours));
    // Why the pricing is stale, if it is.
    let why = match pricing.published_at() {
        None => Some(format!("pricing {} has no published_at", pricing.version())),
        Some(published) if published.signed_duration_since(now) > PUBLISHED_AHEAD_TOLERATED => {
            Some(format!(
                "pricing {} is dated {}, more than an hour ahead of this sidecar's clock",
                pricing.version(),
                published.to_rfc3339()
            ))
        }
        Some(published) if now.signed_duration_since(published) > age_limit => Some(format!(
            "pricing {} was published at {} and contract {} accepts pricing at most {} hours old",
            pricing.version(),
            published.to_rfc3339(),
            contract.version,
            limit.hours
        )),
        Some(_) => None,
    };
    match (why, limit.on_stale) {
        (None, _) => Ok(PricingAge::Fresh),
        (Some(_), StalePricingAction::Continue) => Ok(PricingAge::Stale),
        (Some(detail), StalePricingAction::Stop) => Err(Stop {
            reason: ReasonCode::PricingStale,
            detail,
        }),
    }
}

/// One budget's state right after the reservation, as the ledger reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetAfterReserve {
    /// Budget.
    pub budget_id: String,
    /// Soft cap, if any.
    pub soft_cap: Option<NanoUsd>,
    /// committed + reserved + overrun, this reservation included.
    pub used_and_reserved: NanoUsd,
}

/// After a successful reservation: continue, or require approval because a soft cap was crossed
/// (the caller then releases the reservation and opens an approval).
pub fn evaluate_balances(
    contract: &Contract,
    budgets: &[BudgetAfterReserve],
) -> (ReasonCode, Option<String>) {
    if contract.approval_above_soft_cap {
        for b in budgets {
            if let Some(cap) = b.soft_cap
                && b.used_and_reserved > cap
            {
                return (ReasonCode::SoftCapReached, Some(b.budget_id.clone()));
            }
        }
    }
    (ReasonCode::WithinBudget, None)
}

/// What a sidecar loads: a contract and its pricing snapshot, identified together by the sha256
/// of their RFC 8785 canonical JSON (the operator compiles it into a ConfigMap, issue 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The contract.
    pub contract: Contract,
    /// The validated pricing.
    pub pricing: Pricing,
    /// sha256 of the canonical bundle bytes.
    pub sha256_hex: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleJson {
    contract: Contract,
    pricing: PricingSnapshot,
}

impl Bundle {
    /// Parses a bundle and refuses it unless its canonical hash is `expected_sha256_hex`.
    ///
    /// # Errors
    /// [`PricingError::Malformed`] (unknown fields included), [`PricingError::HashMismatch`], or a
    /// pricing validation error.
    pub fn from_json_verified(
        json: &[u8],
        expected_sha256_hex: &str,
    ) -> Result<Self, PricingError> {
        let parsed: BundleJson =
            serde_json::from_slice(json).map_err(|e| PricingError::Malformed(e.to_string()))?;
        let bytes = serde_json_canonicalizer::to_vec(&parsed)
            .map_err(|e| PricingError::Malformed(e.to_string()))?;
        let sha256_hex = hex::encode(Sha256::digest(&bytes));
        if sha256_hex != expected_sha256_hex {
            return Err(PricingError::HashMismatch {
                expected: expected_sha256_hex.to_owned(),
                actual: sha256_hex,
            });
        }
        check_pairing(&parsed.contract, &parsed.pricing)?;
        Ok(Self {
            contract: parsed.contract,
            pricing: Pricing::new(parsed.pricing)?,
            sha256_hex,
        })
    }

    /// The canonical bytes and id of a contract and snapshot (what the operator writes).
    ///
    /// # Errors
    /// [`PricingError::Malformed`] when the values cannot be canonicalized.
    pub fn canonical(
        contract: &Contract,
        pricing: &PricingSnapshot,
    ) -> Result<(Vec<u8>, String), PricingError> {
        check_pairing(contract, pricing)?;
        let bundle = BundleJson {
            contract: contract.clone(),
            pricing: pricing.clone(),
        };
        let bytes = serde_json_canonicalizer::to_vec(&bundle)
            .map_err(|e| PricingError::Malformed(e.to_string()))?;
        let id = hex::encode(Sha256::digest(&bytes));
        Ok((bytes, id))
    }
}

/// Refuses a contract whose pricing age limit is out of range, or that limits the age of a
/// snapshot that does not say when it was published (every call would be stale).
fn check_pairing(contract: &Contract, pricing: &PricingSnapshot) -> Result<(), PricingError> {
    let Some(limit) = contract.pricing_max_age else {
        return Ok(());
    };
    if !(1..=PRICING_MAX_AGE_HOURS_MAX).contains(&limit.hours) {
        return Err(PricingError::Malformed(format!(
            "pricing_max_age.hours must be from 1 to {PRICING_MAX_AGE_HOURS_MAX}"
        )));
    }
    if pricing.published_at.is_none() {
        return Err(PricingError::PublishedAtMissing {
            contract: contract.version.clone(),
            pricing: pricing.version.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pricing() -> Pricing {
        Pricing::from_json(
            br#"{"version":"p1","entries":[{"provider":"openai","model":"gpt-5",
                 "price":{"input":1000000000,"cached_input":100000000,"cache_write":1000000000,"output":10000000000}}]}"#,
        )
        .unwrap()
    }

    fn contract() -> Contract {
        serde_json::from_str(r#"{"version":"c1","max_output_tokens":1000}"#).unwrap()
    }

    fn call(model: &str, max_output_tokens: Option<u32>) -> Call {
        Call {
            choices: 1,
            provider: Provider::Openai,
            model: model.into(),
            input_tokens_upper_bound: 1_000,
            max_output_tokens,
        }
    }

    fn reason(result: Result<Planned, Stop>) -> ReasonCode {
        result.unwrap_err().reason
    }

    #[test]
    fn defaults_fail_closed() {
        let c = contract();
        assert_eq!(
            (c.unknown_model, c.fail_policy, c.approval_above_soft_cap),
            (UnknownModelPolicy::Stop, FailPolicy::Closed, true)
        );
        assert!(
            serde_json::from_str::<Contract>(r#"{"version":"c","max_output_tokens":1,"typo":1}"#)
                .is_err()
        );
    }

    #[test]
    fn worst_case_uses_the_contract_cap_when_the_client_sets_none() {
        let planned = evaluate_call(&contract(), &pricing(), &call("gpt-5", None)).unwrap();
        // 1000 input × $1/M + 1000 output × $10/M = 1000 + 10000 (×1000 nano-USD).
        assert_eq!(
            (planned.reserve.get(), planned.max_output_tokens),
            (11_000_000, 1_000)
        );
        let smaller = evaluate_call(&contract(), &pricing(), &call("gpt-5", Some(100))).unwrap();
        assert_eq!(
            (smaller.reserve.get(), smaller.max_output_tokens),
            (2_000_000, 100)
        );
        assert_eq!(
            reason(evaluate_call(
                &contract(),
                &pricing(),
                &call("gpt-5", Some(1_001))
            )),
            ReasonCode::MaxOutputTokensAboveCap
        );
    }

    #[test]
    fn every_choice_is_reserved_and_the_input_once() {
        // n = 3 completions of at most 100 tokens each: 1000 input × $1/M + 300 output × $10/M.
        let three = Call {
            choices: 3,
            ..call("gpt-5", Some(100))
        };
        let planned = evaluate_call(&contract(), &pricing(), &three).unwrap();
        assert_eq!(
            (planned.reserve.get(), planned.max_output_tokens),
            (4_000_000, 100),
            "the output limit the upstream enforces stays per choice"
        );
        let mut c = contract();
        c.max_cost_per_call_nano_usd = Some(NanoUsd::new(3_999_999).unwrap());
        assert_eq!(
            reason(evaluate_call(&c, &pricing(), &three)),
            ReasonCode::PerCallCapExceeded,
            "the per-call cap sees every choice"
        );
        c.max_cost_per_call_nano_usd = None;
        c.unknown_model = UnknownModelPolicy::ReserveCeiling {
            ceiling_nano_usd: NanoUsd::new(5_000).unwrap(),
        };
        let mystery = Call {
            choices: 3,
            ..call("mystery", None)
        };
        assert_eq!(
            evaluate_call(&c, &pricing(), &mystery)
                .unwrap()
                .reserve
                .get(),
            15_000,
            "a ceiling stands for one completion"
        );
    }

    #[test]
    fn model_lists() {
        let mut c = contract();
        c.deny_models = vec!["gpt-5".into()];
        c.allow_models = vec!["gpt-5".into()];
        assert_eq!(
            reason(evaluate_call(&c, &pricing(), &call("gpt-5", None))),
            ReasonCode::ModelDenied
        );
        c.deny_models.clear();
        assert!(evaluate_call(&c, &pricing(), &call("gpt-5", None)).is_ok());
        assert_eq!(
            reason(evaluate_call(&c, &pricing(), &call("gpt-4o", None))),
            ReasonCode::ModelNotAllowed
        );
    }

    #[test]
    fn unknown_models_stop_unless_a_ceiling_is_configured() {
        let mut c = contract();
        assert_eq!(
            reason(evaluate_call(&c, &pricing(), &call("mystery", None))),
            ReasonCode::ModelPriceUnknown
        );
        c.unknown_model = UnknownModelPolicy::ReserveCeiling {
            ceiling_nano_usd: NanoUsd::new(5_000_000_000).unwrap(),
        };
        assert_eq!(
            evaluate_call(&c, &pricing(), &call("mystery", None))
                .unwrap()
                .reserve
                .get(),
            5_000_000_000
        );
    }

    #[test]
    fn per_call_cap() {
        let mut c = contract();
        c.max_cost_per_call_nano_usd = Some(NanoUsd::new(10_999_999).unwrap());
        assert_eq!(
            reason(evaluate_call(&c, &pricing(), &call("gpt-5", None))),
            ReasonCode::PerCallCapExceeded
        );
        c.max_cost_per_call_nano_usd = Some(NanoUsd::new(11_000_000).unwrap());
        assert!(evaluate_call(&c, &pricing(), &call("gpt-5", None)).is_ok());
    }

    #[test]
    fn soft_cap_requires_approval_once_crossed() {
        let budget = |used| BudgetAfterReserve {
            budget_id: "team".into(),
            soft_cap: Some(NanoUsd::new(100).unwrap()),
            used_and_reserved: NanoUsd::new(used).unwrap(),
        };
        assert_eq!(
            evaluate_balances(&contract(), &[budget(100)]),
            (ReasonCode::WithinBudget, None)
        );
        assert_eq!(
            evaluate_balances(&contract(), &[budget(101)]),
            (ReasonCode::SoftCapReached, Some("team".into()))
        );
        let mut c = contract();
        c.approval_above_soft_cap = false;
        assert_eq!(
            evaluate_balances(&c, &[budget(101)]).0,
            ReasonCode::WithinBudget
        );
    }

    #[test]
    fn bundles_load_only_with_their_hash() {
        let snapshot: PricingSnapshot = serde_json::from_str(
            r#"{"version":"p1","entries":[{"provider":"openai","model":"gpt-5",
                 "price":{"input":1,"cached_input":1,"cache_write":1,"output":1}}]}"#,
        )
        .unwrap();
        let (bytes, id) = Bundle::canonical(&contract(), &snapshot).unwrap();
        let bundle = Bundle::from_json_verified(&bytes, &id).unwrap();
        assert_eq!(
            (bundle.contract.version.as_str(), bundle.pricing.version()),
            ("c1", "p1")
        );
        let tampered = String::from_utf8(bytes.clone())
            .unwrap()
            .replace(r#""output":1"#, r#""output":0"#);
        assert!(matches!(
            Bundle::from_json_verified(tampered.as_bytes(), &id),
            Err(PricingError::HashMismatch { .. })
        ));
        let extra = String::from_utf8(bytes)
            .unwrap()
            .replacen('{', r#"{"extra":true,"#, 1);
        assert!(matches!(
            Bundle::from_json_verified(extra.as_bytes(), &id),
            Err(PricingError::Malformed(_))
        ));
    }

    #[test]
    fn reason_codes_serialize_as_their_stable_names() {
        for code in [
            ReasonCode::WithinBudget,
            ReasonCode::ModelPriceUnknown,
            ReasonCode::SoftCapReached,
            ReasonCode::PricingStale,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    fn published(at: &str) -> Pricing {
        Pricing::from_json(
            format!(
                r#"{{"version":"p2","published_at":"{at}","entries":[{{"provider":"openai",
                     "model":"gpt-5","price":{{"input":1,"cached_input":1,"cache_write":1,"output":1}}}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn limited(hours: u32, on_stale: StalePricingAction) -> Contract {
        Contract {
            pricing_max_age: Some(PricingMaxAge { hours, on_stale }),
            ..contract()
        }
    }

    #[test]
    fn pricing_older_than_the_contract_accepts_stops_or_is_marked() {
        let dated = published("2026-11-01T00:00:00Z");
        let at = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(t)
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        let stop = limited(24, StalePricingAction::Stop);
        // Exactly 24 hours old is still fresh; a second later it is not.
        assert_eq!(
            pricing_age(&stop, &dated, at("2026-11-02T00:00:00Z")),
            Ok(PricingAge::Fresh)
        );
        let refused = pricing_age(&stop, &dated, at("2026-11-02T00:00:01Z")).unwrap_err();
        assert_eq!(refused.reason, ReasonCode::PricingStale);
        assert!(refused.detail.contains("p2"), "{}", refused.detail);
        let marked = limited(24, StalePricingAction::Continue);
        assert_eq!(
            pricing_age(&marked, &dated, at("2026-11-02T00:00:01Z")),
            Ok(PricingAge::Stale)
        );
        // Published up to an hour ahead of the clock (skew): fresh; further ahead (a typo in
        // the date would otherwise switch the limit off): stale. No limit: any age is fresh.
        assert_eq!(
            pricing_age(&stop, &dated, at("2026-10-31T23:00:00Z")),
            Ok(PricingAge::Fresh)
        );
        let ahead = pricing_age(&stop, &dated, at("2026-10-31T22:59:59Z")).unwrap_err();
        assert!(
            ahead.detail.contains("ahead of this sidecar's clock"),
            "{}",
            ahead.detail
        );
        assert_eq!(
            pricing_age(&marked, &dated, at("2026-10-01T00:00:00Z")),
            Ok(PricingAge::Stale)
        );
        assert_eq!(
            pricing_age(&contract(), &dated, at("2036-01-01T00:00:00Z")),
            Ok(PricingAge::Fresh)
        );
        // No published_at under a limit: stale (the bundle check refuses it earlier).
        let undated = pricing();
        assert!(undated.published_at().is_none());
        assert!(pricing_age(&stop, &undated, at("2026-11-01T00:00:00Z")).is_err());
    }

    #[test]
    fn published_at_must_be_rfc3339_and_is_out_of_the_hash_when_absent() {
        assert!(matches!(
            Pricing::from_json(br#"{"version":"p","published_at":"yesterday","entries":[]}"#),
            Err(PricingError::PublishedAtInvalid(_))
        ));
        let without = Pricing::from_json(br#"{"version":"p","entries":[]}"#).unwrap();
        let with = Pricing::from_json(
            br#"{"version":"p","published_at":"2026-11-01T00:00:00+01:00","entries":[]}"#,
        )
        .unwrap();
        assert_ne!(without.sha256_hex(), with.sha256_hex());
        assert_eq!(
            with.published_at().unwrap().to_rfc3339(),
            "2026-10-31T23:00:00+00:00"
        );
        // A snapshot without the field hashes its canonical JSON without it.
        let canonical = serde_json_canonicalizer::to_vec(&PricingSnapshot {
            version: "p".into(),
            published_at: None,
            entries: vec![],
        })
        .unwrap();
        assert_eq!(canonical, br#"{"entries":[],"version":"p"}"#);
    }

    #[test]
    fn a_bundle_limiting_the_age_of_undated_or_with_a_bad_limit_is_refused() {
        let undated = PricingSnapshot {
            version: "p".into(),
            published_at: None,
            entries: vec![],
        };
        assert!(matches!(
            Bundle::canonical(&limited(24, StalePricingAction::Stop), &undated),
            Err(PricingError::PublishedAtMissing { .. })
        ));
        let dated = PricingSnapshot {
            published_at: Some("2026-11-01T00:00:00Z".into()),
            ..undated
        };
        assert!(matches!(
            Bundle::canonical(&limited(0, StalePricingAction::Stop), &dated),
            Err(PricingError::Malformed(_))
        ));
        assert!(matches!(
            Bundle::canonical(
                &limited(PRICING_MAX_AGE_HOURS_MAX + 1, StalePricingAction::Stop),
                &dated
            ),
            Err(PricingError::Malformed(_))
        ));
        let (bytes, id) =
            Bundle::canonical(&limited(24, StalePricingAction::Continue), &dated).unwrap();
        let bundle = Bundle::from_json_verified(&bytes, &id).unwrap();
        assert_eq!(
            bundle.contract.pricing_max_age,
            Some(PricingMaxAge {
                hours: 24,
                on_stale: StalePricingAction::Continue
            })
        );
        // The same refusal when a sidecar loads such a bundle written by hand.
        let undated_bundle = String::from_utf8(bytes)
            .unwrap()
            .replace(r#""published_at":"2026-11-01T00:00:00Z","#, "");
        let undated_id = hex::encode(Sha256::digest(undated_bundle.as_bytes()));
        assert!(matches!(
            Bundle::from_json_verified(undated_bundle.as_bytes(), &undated_id),
            Err(PricingError::PublishedAtMissing { .. })
        ));
    }
}
