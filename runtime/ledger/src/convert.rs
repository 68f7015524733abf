//! Wire (proto) ⇄ domain conversion. Every request is validated here, before it can reach the
//! writer queue or SQL, so bad input changes nothing.

use spendguard_core::ids::{
    APPROVAL_CALL_ID_LEN_MAX, IDEMPOTENCY_KEY_LEN_MAX, check_idempotency_key, check_name,
    check_text, parse_reservation_id,
};
use spendguard_core::lease::{AcquireLease, LEASE_TTL_MS_MAX, LEASE_TTL_MS_MIN, LeaseOutcome};
use spendguard_core::plan::{
    APPROVAL_TTL_MS_MAX, APPROVAL_TTL_MS_MIN, ApprovalContext, ApprovalDecision, ApprovalRow,
    ApprovalState, Balance, BudgetRow, Commit, CreateApproval, Credit, DecisionContext, Fencing,
    PricingRef, RESERVE_SET_BUDGETS_MAX, RETENTION_DAYS_MAX, RecordFailOpen, RecordStops,
    RegisterPricing, RegisterSigningKey, Release, ReservationState, ReserveSet, ResolveApproval,
    RetentionPolicy, STOP_DETAIL_LEN_MAX, STOP_RECORDS_MAX, SYSTEM_TENANT_ID, SigningKeyRow,
    StopRecord, TEXT_LEN_MAX, UpsertBudget, UpsertRetentionPolicy, UpsertTenant,
};
use spendguard_core::window::BudgetWindow;
use spendguard_core::{ErrorCode, LedgerError, NanoUsd};
use spendguard_proto::ledger::v1 as pb;
use std::collections::BTreeSet;

/// Shortest reservation TTL.
pub const RESERVATION_TTL_MS_MIN: u32 = 1_000;
/// Longest reservation TTL: an hour covers the slowest streamed completion.
pub const RESERVATION_TTL_MS_MAX: u32 = 3_600_000;
/// Most reservations one sweep call expires.
pub const SWEEP_MAX: u32 = 10_000;
/// The largest integer a JSON number carries exactly (2^53 - 1): audit events are RFC 8785
/// canonical JSON, whose numbers are IEEE doubles.
pub const JSON_SAFE_INTEGER_MAX: u64 = (1 << 53) - 1;
/// Most budgets one GetBalances call reads.
pub const BALANCES_BUDGETS_MAX: usize = 256;

type Result<T> = std::result::Result<T, LedgerError>;

fn amount(field: &'static str, value: i64, positive: bool) -> Result<NanoUsd> {
    let parsed = if positive {
        NanoUsd::positive(value)
    } else {
        NanoUsd::new(value)
    };
    parsed.map_err(|source| LedgerError::AmountInvalid { field, source })
}

fn ttl(field: &'static str, value: u32, min: u32, max: u32) -> Result<u32> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(LedgerError::TtlInvalid {
            field,
            value: value.into(),
            min: min.into(),
            max: max.into(),
        })
    }
}

fn fencing(token: Option<&pb::FencingToken>) -> Result<Fencing> {
    let token = token.ok_or(LedgerError::FencingEpochMissing)?;
    check_name("fencing.scope_id", &token.scope_id)?;
    if token.epoch == 0 {
        return Err(LedgerError::FencingEpochMissing);
    }
    Ok(Fencing {
        scope_id: token.scope_id.clone(),
        epoch: token.epoch,
    })
}

fn budget_ids(field: &'static str, ids: &[String], max: usize) -> Result<Vec<String>> {
    if ids.is_empty() {
        return Err(LedgerError::InvalidArgument {
            field,
            reason: "at least one budget is required".into(),
        });
    }
    if ids.len() > max {
        return Err(LedgerError::RequestTooLarge {
            field,
            len: ids.len(),
            max,
        });
    }
    let mut seen = BTreeSet::new();
    for id in ids {
        check_name(field, id)?;
        if !seen.insert(id) {
            return Err(LedgerError::InvalidArgument {
                field,
                reason: format!("budget {id} appears twice"),
            });
        }
    }
    Ok(ids.to_vec())
}

fn pricing(value: Option<&pb::PricingRef>) -> Result<PricingRef> {
    let value = value.ok_or(LedgerError::InvalidArgument {
        field: "pricing",
        reason: "required".into(),
    })?;
    if value.version.is_empty() {
        return Err(LedgerError::InvalidArgument {
            field: "pricing.version",
            reason: "required".into(),
        });
    }
    check_text("pricing.version", &value.version, TEXT_LEN_MAX)?;
    let hex_ok = value.sha256_hex.len() == 64
        && value
            .sha256_hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex_ok {
        return Err(LedgerError::InvalidArgument {
            field: "pricing.sha256_hex",
            reason: "must be 64 lowercase hex characters".into(),
        });
    }
    Ok(PricingRef {
        version: value.version.clone(),
        sha256_hex: value.sha256_hex.clone(),
    })
}

fn context(value: Option<&pb::DecisionContext>) -> Result<DecisionContext> {
    let value = value.cloned().unwrap_or_default();
    for (field, text) in [
        ("context.run_id", &value.run_id),
        ("context.workflow_id", &value.workflow_id),
        ("context.call_id", &value.call_id),
        ("context.provider", &value.provider),
        ("context.model", &value.model),
        ("context.contract_version", &value.contract_version),
    ] {
        check_text(field, text, TEXT_LEN_MAX)?;
    }
    let approval_id = if value.approval_id.is_empty() {
        None
    } else {
        Some(parse_reservation_id(
            "context.approval_id",
            &value.approval_id,
        )?)
    };
    Ok(DecisionContext {
        run_id: value.run_id,
        workflow_id: value.workflow_id,
        call_id: value.call_id,
        provider: value.provider,
        model: value.model,
        contract_version: value.contract_version,
        pricing_stale: value.pricing_stale,
        approval_id,
    })
}

/// Validates a ReserveSet request.
///
/// # Errors
/// The first invalid field.
pub fn reserve_set(r: &pb::ReserveSetRequest) -> Result<ReserveSet> {
    check_name("tenant_id", &r.tenant_id)?;
    check_idempotency_key("idempotency_key", &r.idempotency_key)?;
    Ok(ReserveSet {
        tenant_id: r.tenant_id.clone(),
        idempotency_key: r.idempotency_key.clone(),
        budget_ids: budget_ids("budget_ids", &r.budget_ids, RESERVE_SET_BUDGETS_MAX)?,
        amount: amount("amount_nano_usd", r.amount_nano_usd, true)?,
        fencing: fencing(r.fencing.as_ref())?,
        ttl_ms: ttl(
            "ttl_ms",
            r.ttl_ms,
            RESERVATION_TTL_MS_MIN,
            RESERVATION_TTL_MS_MAX,
        )?,
        pricing: pricing(r.pricing.as_ref())?,
        context: context(r.context.as_ref())?,
        credit: credit(r)?,
    })
}

fn credit(r: &pb::ReserveSetRequest) -> Result<Credit> {
    match (r.credit, r.draw_from_reservation_id.is_empty()) {
        (false, true) => Ok(Credit::None),
        (true, true) => Ok(Credit::Open),
        (false, false) => Ok(Credit::DrawFrom(parse_reservation_id(
            "draw_from_reservation_id",
            &r.draw_from_reservation_id,
        )?)),
        (true, false) => Err(LedgerError::InvalidArgument {
            field: "draw_from_reservation_id",
            reason: "a credit cannot be drawn from another credit".into(),
        }),
    }
}

/// Validates a Commit request.
///
/// # Errors
/// The first invalid field.
pub fn commit(r: &pb::CommitRequest) -> Result<Commit> {
    check_name("tenant_id", &r.tenant_id)?;
    Ok(Commit {
        tenant_id: r.tenant_id.clone(),
        reservation_id: parse_reservation_id("reservation_id", &r.reservation_id)?,
        actual: amount("actual_nano_usd", r.actual_nano_usd, false)?,
        fencing: fencing(r.fencing.as_ref())?,
    })
}

/// Validates a Release request.
///
/// # Errors
/// The first invalid field.
pub fn release(r: &pb::ReleaseRequest) -> Result<Release> {
    check_name("tenant_id", &r.tenant_id)?;
    check_text("reason", &r.reason, TEXT_LEN_MAX)?;
    Ok(Release {
        tenant_id: r.tenant_id.clone(),
        reservation_id: parse_reservation_id("reservation_id", &r.reservation_id)?,
        fencing: fencing(r.fencing.as_ref())?,
        reason: r.reason.clone(),
    })
}

/// Validates a SweepExpired request.
///
/// # Errors
/// When the count is 0 or above [`SWEEP_MAX`].
pub fn sweep(r: &pb::SweepExpiredRequest) -> Result<u32> {
    match r.max_reservations {
        0 => Err(LedgerError::InvalidArgument {
            field: "max_reservations",
            reason: "must be positive".into(),
        }),
        n if n > SWEEP_MAX => Err(LedgerError::RequestTooLarge {
            field: "max_reservations",
            len: n as usize,
            max: SWEEP_MAX as usize,
        }),
        n => Ok(n),
    }
}

/// Validates an AcquireFencingLease request.
///
/// # Errors
/// The first invalid field.
pub fn acquire_lease(r: &pb::AcquireFencingLeaseRequest) -> Result<AcquireLease> {
    check_name("scope_id", &r.scope_id)?;
    check_name("tenant_id", &r.tenant_id)?;
    check_name("workload_instance_id", &r.workload_instance_id)?;
    Ok(AcquireLease {
        scope_id: r.scope_id.clone(),
        tenant_id: r.tenant_id.clone(),
        workload_instance_id: r.workload_instance_id.clone(),
        ttl_ms: ttl("ttl_ms", r.ttl_ms, LEASE_TTL_MS_MIN, LEASE_TTL_MS_MAX)?,
        expected_epoch: r.expected_epoch,
        force: r.force,
        request_id: if r.request_id.is_empty() {
            None
        } else {
            check_idempotency_key("request_id", &r.request_id)?;
            Some(r.request_id.clone())
        },
    })
}

/// Validates a RegisterPricing request.
///
/// # Errors
/// The first invalid field.
pub fn register_pricing(r: &pb::RegisterPricingRequest) -> Result<RegisterPricing> {
    check_name("tenant_id", &r.tenant_id)?;
    Ok(RegisterPricing {
        tenant_id: r.tenant_id.clone(),
        pricing: pricing(r.pricing.as_ref())?,
    })
}

/// Longest signing key id (the `signing_keys.key_id` check).
pub const SIGNING_KEY_ID_LEN_MAX: usize = 128;

fn time_ms(field: &'static str, value: i64) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    if value == 0 {
        return Ok(None);
    }
    if value < 0 {
        return Err(LedgerError::InvalidArgument {
            field,
            reason: "must be a positive Unix time in milliseconds (0 = unset)".into(),
        });
    }
    chrono::DateTime::from_timestamp_millis(value)
        .map(Some)
        .ok_or(LedgerError::InvalidArgument {
            field,
            reason: "out of range".into(),
        })
}

/// Validates a RegisterSigningKey request: key id grammar, a known algorithm, a public key valid
/// for it (stored in canonical form, so raw and SPKI encodings of one key are the same key) and
/// a consistent window.
///
/// # Errors
/// The first invalid field.
pub fn register_signing_key(r: &pb::RegisterSigningKeyRequest) -> Result<RegisterSigningKey> {
    check_name("key_id", &r.key_id)?;
    if r.key_id.len() > SIGNING_KEY_ID_LEN_MAX {
        return Err(LedgerError::IdMalformed {
            field: "key_id",
            reason: format!("longer than {SIGNING_KEY_ID_LEN_MAX} characters"),
        });
    }
    let algorithm: spendguard_evidence::Algorithm =
        r.algorithm
            .parse()
            .map_err(|_| LedgerError::InvalidArgument {
                field: "algorithm",
                reason: "must be ed25519 or ecdsa-p256-sha256".into(),
            })?;
    let public_key =
        spendguard_evidence::PublicKey::from_bytes(algorithm, &r.public_key).map_err(|e| {
            LedgerError::InvalidArgument {
                field: "public_key",
                reason: e.to_string(),
            }
        })?;
    let valid_from = time_ms("valid_from_unix_ms", r.valid_from_unix_ms)?.ok_or(
        LedgerError::InvalidArgument {
            field: "valid_from_unix_ms",
            reason: "required".into(),
        },
    )?;
    let valid_until = time_ms("valid_until_unix_ms", r.valid_until_unix_ms)?;
    if valid_until.is_some_and(|until| until <= valid_from) {
        return Err(LedgerError::InvalidArgument {
            field: "valid_until_unix_ms",
            reason: "must be after valid_from_unix_ms".into(),
        });
    }
    Ok(RegisterSigningKey {
        key_id: r.key_id.clone(),
        key: SigningKeyRow {
            algorithm: algorithm.as_str().to_owned(),
            public_key: public_key.to_bytes(),
            valid_from,
            valid_until,
            revoked_at: time_ms("revoked_at_unix_ms", r.revoked_at_unix_ms)?,
        },
    })
}

/// Validates an UpsertTenant request.
///
/// # Errors
/// The first invalid field.
pub fn upsert_tenant(r: &pb::UpsertTenantRequest) -> Result<UpsertTenant> {
    check_name("tenant_id", &r.tenant_id)?;
    if r.tenant_id == SYSTEM_TENANT_ID {
        return Err(LedgerError::IdMalformed {
            field: "tenant_id",
            reason: format!("{SYSTEM_TENANT_ID} is reserved for the ledger's own audit events"),
        });
    }
    check_text("display_name", &r.display_name, TEXT_LEN_MAX)?;
    Ok(UpsertTenant {
        tenant_id: r.tenant_id.clone(),
        display_name: r.display_name.clone(),
    })
}

/// Validates an UpsertBudget request.
///
/// # Errors
/// The first invalid field.
pub fn upsert_budget(r: &pb::UpsertBudgetRequest) -> Result<UpsertBudget> {
    check_name("tenant_id", &r.tenant_id)?;
    check_name("budget_id", &r.budget_id)?;
    let limit = amount("limit_nano_usd", r.limit_nano_usd, false)?;
    let soft_cap = match amount("soft_cap_nano_usd", r.soft_cap_nano_usd, false)? {
        cap if cap.is_zero() => None,
        cap if cap > limit => {
            return Err(LedgerError::BudgetInvalid(format!(
                "soft cap {cap} exceeds limit {limit}"
            )));
        }
        cap => Some(cap),
    };
    let window = match pb::BudgetWindow::try_from(r.window) {
        Ok(pb::BudgetWindow::Lifetime) => BudgetWindow::Lifetime,
        Ok(pb::BudgetWindow::CalendarDayUtc) => BudgetWindow::CalendarDayUtc,
        Ok(pb::BudgetWindow::CalendarMonthUtc) => BudgetWindow::CalendarMonthUtc,
        Ok(pb::BudgetWindow::Unspecified) | Err(_) => {
            return Err(LedgerError::BudgetInvalid(
                "window must be LIFETIME, CALENDAR_DAY_UTC or CALENDAR_MONTH_UTC".into(),
            ));
        }
    };
    Ok(UpsertBudget {
        tenant_id: r.tenant_id.clone(),
        budget_id: r.budget_id.clone(),
        definition: BudgetRow {
            limit,
            soft_cap,
            window,
        },
        create_only: false,
    })
}

/// Validates a GetBalances request.
///
/// # Errors
/// The first invalid field.
pub fn balances_request(r: &pb::GetBalancesRequest) -> Result<Vec<String>> {
    check_name("tenant_id", &r.tenant_id)?;
    budget_ids("budget_ids", &r.budget_ids, BALANCES_BUDGETS_MAX)
}

/// Validates a CheckFencing request: the tenant and the fencing token (epoch 0 refused).
///
/// # Errors
/// The first invalid field.
pub fn check_fencing_request(r: &pb::CheckFencingRequest) -> Result<Fencing> {
    check_name("tenant_id", &r.tenant_id)?;
    fencing(r.fencing.as_ref())
}

/// Most approvals one ListApprovals page returns.
pub const APPROVALS_PAGE_MAX: u32 = 500;
/// Page size when the request leaves it 0.
pub const APPROVALS_PAGE_DEFAULT: u32 = 100;

fn sha256_hex_or_empty(field: &'static str, value: &str) -> Result<()> {
    let ok = value.is_empty()
        || (value.len() == 64
            && value
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(LedgerError::InvalidArgument {
            field,
            reason: "must be empty or 64 lowercase hex characters".into(),
        })
    }
}

/// Validates a CreateApproval request.
///
/// # Errors
/// The first invalid field.
pub fn create_approval(r: &pb::CreateApprovalRequest) -> Result<CreateApproval> {
    check_name("tenant_id", &r.tenant_id)?;
    check_idempotency_key("idempotency_key", &r.idempotency_key)?;
    if r.idempotency_key.len() > APPROVAL_CALL_ID_LEN_MAX {
        // Refused now rather than approved and then unusable.
        return Err(LedgerError::IdMalformed {
            field: "idempotency_key",
            reason: format!(
                "at most {APPROVAL_CALL_ID_LEN_MAX} characters: the call resumes under \
                 `<call id>/approved/<approval id>`, an idempotency key of at most \
                 {IDEMPOTENCY_KEY_LEN_MAX}"
            ),
        });
    }
    let budgets = budget_ids("budget_ids", &r.budget_ids, RESERVE_SET_BUDGETS_MAX)?;
    check_name("budget_id", &r.budget_id)?;
    if !budgets.contains(&r.budget_id) {
        return Err(LedgerError::InvalidArgument {
            field: "budget_id",
            reason: "must be one of budget_ids".into(),
        });
    }
    let amount = amount("amount_nano_usd", r.amount_nano_usd, true)?;
    let fencing = fencing(r.fencing.as_ref())?;
    let ttl_ms = ttl("ttl_ms", r.ttl_ms, APPROVAL_TTL_MS_MIN, APPROVAL_TTL_MS_MAX)?;
    if r.reason_code.is_empty() {
        return Err(LedgerError::InvalidArgument {
            field: "reason_code",
            reason: "required".into(),
        });
    }
    check_text("reason_code", &r.reason_code, TEXT_LEN_MAX)?;
    check_text("requested_by", &r.requested_by, TEXT_LEN_MAX)?;
    sha256_hex_or_empty("bundle_sha256_hex", &r.bundle_sha256_hex)?;
    Ok(CreateApproval {
        tenant_id: r.tenant_id.clone(),
        idempotency_key: r.idempotency_key.clone(),
        budget_ids: budgets,
        budget_id: r.budget_id.clone(),
        amount,
        fencing,
        ttl_ms,
        context: ApprovalContext {
            reason_code: r.reason_code.clone(),
            requested_by: r.requested_by.clone(),
            pricing: pricing(r.pricing.as_ref())?,
            bundle_sha256_hex: r.bundle_sha256_hex.clone(),
            decision: context(r.context.as_ref())?,
        },
    })
}

/// Validates a RecordFailOpen request. The fencing epoch must be >= 1 but is not compared
/// with the scope's (that happens, and is recorded, in the planner).
///
/// # Errors
/// The first invalid field.
pub fn record_fail_open(r: &pb::RecordFailOpenRequest) -> Result<RecordFailOpen> {
    check_name("tenant_id", &r.tenant_id)?;
    check_idempotency_key("call_id", &r.call_id)?;
    let budgets = budget_ids("budget_ids", &r.budget_ids, RESERVE_SET_BUDGETS_MAX)?;
    let actual = amount("actual_nano_usd", r.actual_nano_usd, false)?;
    let fencing = fencing(r.fencing.as_ref())?;
    let pricing = pricing(r.pricing.as_ref())?;
    sha256_hex_or_empty("contract_sha256_hex", &r.contract_sha256_hex)?;
    let decided_at = (r.decided_at_unix_ms > 0)
        .then(|| chrono::DateTime::from_timestamp_millis(r.decided_at_unix_ms))
        .flatten()
        .ok_or_else(|| LedgerError::InvalidArgument {
            field: "decided_at_unix_ms",
            reason: "required: a positive Unix time in milliseconds".into(),
        })?;
    let mut context = context(r.context.as_ref())?;
    if context.call_id.is_empty() {
        context.call_id = r.call_id.clone();
    } else if context.call_id != r.call_id {
        return Err(LedgerError::InvalidArgument {
            field: "context.call_id",
            reason: "must be empty or equal to call_id".into(),
        });
    }
    Ok(RecordFailOpen {
        tenant_id: r.tenant_id.clone(),
        call_id: r.call_id.clone(),
        budget_ids: budgets,
        actual,
        fencing,
        pricing,
        contract_sha256_hex: r.contract_sha256_hex.clone(),
        decided_at,
        context,
    })
}

fn unix_ms(field: &'static str, value: i64) -> Result<chrono::DateTime<chrono::Utc>> {
    (value > 0)
        .then(|| chrono::DateTime::from_timestamp_millis(value))
        .flatten()
        .ok_or_else(|| LedgerError::InvalidArgument {
            field,
            reason: "required: a positive Unix time in milliseconds".into(),
        })
}

/// Validates a RecordStops request: every record, and distinct record ids.
///
/// # Errors
/// The first invalid field.
pub fn record_stops(r: &pb::RecordStopsRequest) -> Result<RecordStops> {
    check_name("tenant_id", &r.tenant_id)?;
    check_name("fencing_scope_id", &r.fencing_scope_id)?;
    let pricing = pricing(r.pricing.as_ref())?;
    sha256_hex_or_empty("contract_sha256_hex", &r.contract_sha256_hex)?;
    if r.stops.is_empty() {
        return Err(LedgerError::InvalidArgument {
            field: "stops",
            reason: "at least one record is required".into(),
        });
    }
    if r.stops.len() > STOP_RECORDS_MAX {
        return Err(LedgerError::RequestTooLarge {
            field: "stops",
            len: r.stops.len(),
            max: STOP_RECORDS_MAX,
        });
    }
    let mut seen = BTreeSet::new();
    let stops = r
        .stops
        .iter()
        .map(|stop| {
            let record = stop_record(stop)?;
            if seen.insert(record.record_id) {
                Ok(record)
            } else {
                Err(LedgerError::InvalidArgument {
                    field: "stops.record_id",
                    reason: format!("{} appears twice", record.record_id),
                })
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordStops {
        tenant_id: r.tenant_id.clone(),
        fencing_scope_id: r.fencing_scope_id.clone(),
        pricing,
        contract_sha256_hex: r.contract_sha256_hex.clone(),
        stops,
    })
}

fn stop_record(s: &pb::StopRecord) -> Result<StopRecord> {
    let record_id = parse_reservation_id("stops.record_id", &s.record_id)?;
    let reason_ok = (1..=64).contains(&s.reason.len())
        && s.reason.starts_with(|c: char| c.is_ascii_uppercase())
        && s.reason
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if !reason_ok {
        return Err(LedgerError::InvalidArgument {
            field: "stops.reason",
            reason: "must be 1 to 64 of A-Z, 0-9 and _, starting with a letter".into(),
        });
    }
    check_text("stops.detail", &s.detail, STOP_DETAIL_LEN_MAX)?;
    if !s.budget_id.is_empty() {
        check_name("stops.budget_id", &s.budget_id)?;
    }
    let worst_case = amount("stops.worst_case_nano_usd", s.worst_case_nano_usd, false)?;
    let first = unix_ms("stops.first_decided_at_unix_ms", s.first_decided_at_unix_ms)?;
    let last = unix_ms("stops.last_decided_at_unix_ms", s.last_decided_at_unix_ms)?;
    if last < first {
        return Err(LedgerError::InvalidArgument {
            field: "stops.last_decided_at_unix_ms",
            reason: "must not be before first_decided_at_unix_ms".into(),
        });
    }
    let mut context = context(s.context.as_ref())?;
    let call_id = if s.call_id.is_empty() {
        if context != DecisionContext::default() {
            return Err(LedgerError::InvalidArgument {
                field: "stops.context",
                reason: "a summary (no call_id) carries no context".into(),
            });
        }
        None
    } else {
        check_idempotency_key("stops.call_id", &s.call_id)?;
        if context.call_id.is_empty() {
            context.call_id = s.call_id.clone();
        } else if context.call_id != s.call_id {
            return Err(LedgerError::InvalidArgument {
                field: "stops.context.call_id",
                reason: "must be empty or equal to call_id".into(),
            });
        }
        Some(s.call_id.clone())
    };
    // Events carry the count as a JSON number, exact only up to 2^53 - 1 (RFC 8785 numbers are
    // IEEE doubles): a larger count would be signed rounded.
    let count_ok = match &call_id {
        Some(_) => s.count == 1,
        None => (1..=JSON_SAFE_INTEGER_MAX).contains(&s.count),
    };
    if !count_ok {
        return Err(LedgerError::InvalidArgument {
            field: "stops.count",
            reason: "must be 1 for a call, and from 1 to 2^53-1 for a summary".into(),
        });
    }
    if call_id.is_some() && first != last {
        return Err(LedgerError::InvalidArgument {
            field: "stops.last_decided_at_unix_ms",
            reason: "must equal first_decided_at_unix_ms for a call".into(),
        });
    }
    Ok(StopRecord {
        record_id,
        call_id,
        reason: s.reason.clone(),
        detail: s.detail.clone(),
        budget_id: (!s.budget_id.is_empty()).then(|| s.budget_id.clone()),
        worst_case,
        first_decided_at: first,
        last_decided_at: last,
        count: s.count,
        fencing_epoch: (s.fencing_epoch > 0).then_some(s.fencing_epoch),
        context,
    })
}

/// Validates a ResolveApproval request.
///
/// # Errors
/// The first invalid field; [`LedgerError::ApproverRequired`] without an approver.
pub fn resolve_approval(r: &pb::ResolveApprovalRequest) -> Result<ResolveApproval> {
    check_name("tenant_id", &r.tenant_id)?;
    let approval_id = parse_reservation_id("approval_id", &r.approval_id)?;
    let decision = match pb::ApprovalDecision::try_from(r.decision) {
        Ok(pb::ApprovalDecision::Approve) => ApprovalDecision::Approve,
        Ok(pb::ApprovalDecision::Deny) => ApprovalDecision::Deny,
        Ok(pb::ApprovalDecision::Unspecified) | Err(_) => {
            return Err(LedgerError::InvalidArgument {
                field: "decision",
                reason: "must be APPROVE or DENY".into(),
            });
        }
    };
    if r.approver.trim().is_empty() {
        return Err(LedgerError::ApproverRequired);
    }
    check_text("approver", &r.approver, TEXT_LEN_MAX)?;
    check_text("reason", &r.reason, TEXT_LEN_MAX)?;
    Ok(ResolveApproval {
        tenant_id: r.tenant_id.clone(),
        approval_id,
        decision,
        approver: r.approver.clone(),
        reason: r.reason.clone(),
    })
}

/// Validates a GetApproval request: the tenant and the approval id, the same grammar as
/// ResolveApproval's.
///
/// # Errors
/// [`LedgerError::IdMalformed`] for a malformed tenant or approval id.
pub fn get_approval(r: &pb::GetApprovalRequest) -> Result<(String, uuid::Uuid)> {
    check_name("tenant_id", &r.tenant_id)?;
    let approval_id = parse_reservation_id("approval_id", &r.approval_id)?;
    Ok((r.tenant_id.clone(), approval_id))
}

/// A validated ListApprovals request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListApprovals {
    /// Only this tenant's approvals, or every tenant's.
    pub tenant_id: Option<String>,
    /// Only this state, or every state.
    pub state: Option<ApprovalState>,
    /// Page size, 1..=[`APPROVALS_PAGE_MAX`].
    pub page_size: u32,
    /// Approvals after this id.
    pub after: Option<uuid::Uuid>,
}

/// Validates a ListApprovals request.
///
/// # Errors
/// The first invalid field.
pub fn list_approvals(r: &pb::ListApprovalsRequest) -> Result<ListApprovals> {
    let tenant_id = if r.tenant_id.is_empty() {
        None
    } else {
        check_name("tenant_id", &r.tenant_id)?;
        Some(r.tenant_id.clone())
    };
    let state = match pb::ApprovalState::try_from(r.state) {
        Ok(pb::ApprovalState::Unspecified) => None,
        Ok(state) => Some(approval_state_from_proto(state)),
        Err(_) => {
            return Err(LedgerError::InvalidArgument {
                field: "state",
                reason: "unknown approval state".into(),
            });
        }
    };
    let page_size = match r.page_size {
        0 => APPROVALS_PAGE_DEFAULT,
        n if n > APPROVALS_PAGE_MAX => {
            return Err(LedgerError::RequestTooLarge {
                field: "page_size",
                len: n as usize,
                max: APPROVALS_PAGE_MAX as usize,
            });
        }
        n => n,
    };
    let after = if r.page_token.is_empty() {
        None
    } else {
        Some(parse_reservation_id("page_token", &r.page_token)?)
    };
    Ok(ListApprovals {
        tenant_id,
        state,
        page_size,
        after,
    })
}

fn approval_state_from_proto(state: pb::ApprovalState) -> ApprovalState {
    match state {
        pb::ApprovalState::Pending | pb::ApprovalState::Unspecified => ApprovalState::Pending,
        pb::ApprovalState::Approved => ApprovalState::Approved,
        pb::ApprovalState::Denied => ApprovalState::Denied,
        pb::ApprovalState::Expired => ApprovalState::Expired,
        pb::ApprovalState::Cancelled => ApprovalState::Cancelled,
    }
}

/// Wire form of an approval state.
pub fn approval_state_to_proto(state: ApprovalState) -> pb::ApprovalState {
    match state {
        ApprovalState::Pending => pb::ApprovalState::Pending,
        ApprovalState::Approved => pb::ApprovalState::Approved,
        ApprovalState::Denied => pb::ApprovalState::Denied,
        ApprovalState::Expired => pb::ApprovalState::Expired,
        ApprovalState::Cancelled => pb::ApprovalState::Cancelled,
    }
}

/// Wire form of an approval.
pub fn approval_to_proto(a: &ApprovalRow) -> pb::Approval {
    let d = &a.context.decision;
    pb::Approval {
        approval_id: a.id.to_string(),
        tenant_id: a.tenant_id.clone(),
        idempotency_key: a.idempotency_key.clone(),
        budget_ids: a.budget_ids.clone(),
        budget_id: a.budget_id.clone(),
        amount_nano_usd: a.amount.get(),
        state: approval_state_to_proto(a.state).into(),
        reason_code: a.context.reason_code.clone(),
        requested_by: a.context.requested_by.clone(),
        pricing: Some(pb::PricingRef {
            version: a.context.pricing.version.clone(),
            sha256_hex: a.context.pricing.sha256_hex.clone(),
        }),
        bundle_sha256_hex: a.context.bundle_sha256_hex.clone(),
        context: Some(pb::DecisionContext {
            run_id: d.run_id.clone(),
            workflow_id: d.workflow_id.clone(),
            call_id: d.call_id.clone(),
            provider: d.provider.clone(),
            model: d.model.clone(),
            contract_version: d.contract_version.clone(),
            pricing_stale: d.pricing_stale,
            approval_id: d.approval_id.map(|id| id.to_string()).unwrap_or_default(),
        }),
        created_at_unix_ms: a.created_at.timestamp_millis(),
        expires_at_unix_ms: a.expires_at.timestamp_millis(),
        resolved_by: a.resolved_by.clone().unwrap_or_default(),
        resolved_at_unix_ms: a.resolved_at.map_or(0, |t| t.timestamp_millis()),
        resolution_reason: a.resolution_reason.clone().unwrap_or_default(),
    }
}

/// Validates an UpsertRetentionPolicy request: retention 1..=3650 days, redaction (when set)
/// 0..=retention days.
///
/// # Errors
/// The first invalid field.
pub fn upsert_retention_policy(
    r: &pb::UpsertRetentionPolicyRequest,
) -> Result<UpsertRetentionPolicy> {
    check_name("tenant_id", &r.tenant_id)?;
    if !(1..=RETENTION_DAYS_MAX).contains(&r.audit_retention_days) {
        return Err(LedgerError::InvalidArgument {
            field: "audit_retention_days",
            reason: format!("must be 1 to {RETENTION_DAYS_MAX}"),
        });
    }
    if let Some(redact) = r.redact_payloads_after_days
        && redact > r.audit_retention_days
    {
        return Err(LedgerError::InvalidArgument {
            field: "redact_payloads_after_days",
            reason: "payloads cannot outlive the audit records they belong to".into(),
        });
    }
    Ok(UpsertRetentionPolicy {
        tenant_id: r.tenant_id.clone(),
        policy: RetentionPolicy {
            audit_retention_days: r.audit_retention_days,
            redact_payloads_after_days: r.redact_payloads_after_days,
        },
    })
}

/// Wire form of a retention policy.
pub fn retention_policy_to_proto(
    tenant_id: &str,
    policy: RetentionPolicy,
    updated_at: chrono::DateTime<chrono::Utc>,
) -> pb::RetentionPolicy {
    pb::RetentionPolicy {
        tenant_id: tenant_id.to_owned(),
        audit_retention_days: policy.audit_retention_days,
        redact_payloads_after_days: policy.redact_payloads_after_days,
        updated_at_unix_ms: updated_at.timestamp_millis(),
    }
}

/// Wire form of a window kind.
pub fn window_to_proto(window: BudgetWindow) -> pb::BudgetWindow {
    match window {
        BudgetWindow::Lifetime => pb::BudgetWindow::Lifetime,
        BudgetWindow::CalendarDayUtc => pb::BudgetWindow::CalendarDayUtc,
        BudgetWindow::CalendarMonthUtc => pb::BudgetWindow::CalendarMonthUtc,
    }
}

/// Wire form of a reservation's state.
pub fn reservation_state(state: ReservationState) -> pb::ReservationState {
    match state {
        ReservationState::Reserved => pb::ReservationState::Open,
        ReservationState::Committed => pb::ReservationState::Committed,
        ReservationState::Released => pb::ReservationState::Released,
        ReservationState::Expired => pb::ReservationState::Expired,
    }
}

/// Wire form of a balance.
pub fn balance_to_proto(b: &Balance) -> pb::BudgetBalance {
    pb::BudgetBalance {
        budget_id: b.budget_id.clone(),
        window: window_to_proto(b.window).into(),
        window_start_unix_ms: b.window_start.timestamp_millis(),
        limit_nano_usd: b.money.limit.get(),
        soft_cap_nano_usd: b.soft_cap.map_or(0, NanoUsd::get),
        reserved_nano_usd: b.money.reserved.get(),
        committed_nano_usd: b.money.committed.get(),
        overrun_nano_usd: b.money.overrun.get(),
        remaining_nano_usd: b.money.remaining().get(),
    }
}

/// Wire form of a lease transition.
pub fn lease_outcome_to_proto(outcome: LeaseOutcome) -> pb::LeaseOutcome {
    match outcome {
        LeaseOutcome::Acquired => pb::LeaseOutcome::Acquired,
        LeaseOutcome::Renewed => pb::LeaseOutcome::Renewed,
        LeaseOutcome::Restarted => pb::LeaseOutcome::Restarted,
        LeaseOutcome::TakenOver => pb::LeaseOutcome::TakenOver,
        LeaseOutcome::Forced => pb::LeaseOutcome::Forced,
    }
}

/// Wire form of an error code.
pub fn error_code_to_proto(code: ErrorCode) -> pb::ErrorCode {
    match code {
        ErrorCode::InvalidArgument => pb::ErrorCode::InvalidArgument,
        ErrorCode::IdMalformed => pb::ErrorCode::IdMalformed,
        ErrorCode::AmountInvalid => pb::ErrorCode::AmountInvalid,
        ErrorCode::TtlInvalid => pb::ErrorCode::TtlInvalid,
        ErrorCode::RequestTooLarge => pb::ErrorCode::RequestTooLarge,
        ErrorCode::FencingEpochMissing => pb::ErrorCode::FencingEpochMissing,
        ErrorCode::BudgetInvalid => pb::ErrorCode::BudgetInvalid,
        ErrorCode::TenantNotFound => pb::ErrorCode::TenantNotFound,
        ErrorCode::BudgetNotFound => pb::ErrorCode::BudgetNotFound,
        ErrorCode::ReservationNotFound => pb::ErrorCode::ReservationNotFound,
        ErrorCode::FencingScopeNotFound => pb::ErrorCode::FencingScopeNotFound,
        ErrorCode::FencingEpochStale => pb::ErrorCode::FencingEpochStale,
        ErrorCode::FencingLeaseHeld => pb::ErrorCode::FencingLeaseHeld,
        ErrorCode::FencingLeaseExpired => pb::ErrorCode::FencingLeaseExpired,
        ErrorCode::IdempotencyConflict => pb::ErrorCode::IdempotencyConflict,
        ErrorCode::ReservationAlreadyResolved => pb::ErrorCode::ReservationAlreadyResolved,
        ErrorCode::ReservationExpired => pb::ErrorCode::ReservationExpired,
        ErrorCode::BudgetExhausted => pb::ErrorCode::BudgetExhausted,
        ErrorCode::PricingUnknown => pb::ErrorCode::PricingUnknown,
        ErrorCode::PricingConflict => pb::ErrorCode::PricingConflict,
        ErrorCode::SigningKeyConflict => pb::ErrorCode::SigningKeyConflict,
        ErrorCode::SigningKeyRevocationIrreversible => {
            pb::ErrorCode::SigningKeyRevocationIrreversible
        }
        ErrorCode::SigningKeyWindowClosed => pb::ErrorCode::SigningKeyWindowClosed,
        ErrorCode::ProducerInstanceConflict => pb::ErrorCode::ProducerInstanceConflict,
        ErrorCode::Overloaded => pb::ErrorCode::Overloaded,
        ErrorCode::DependencyUnavailable => pb::ErrorCode::DependencyUnavailable,
        ErrorCode::ShuttingDown => pb::ErrorCode::ShuttingDown,
        ErrorCode::EvidenceBacklog => pb::ErrorCode::EvidenceBacklog,
        ErrorCode::SigningUnavailable => pb::ErrorCode::SigningUnavailable,
        ErrorCode::Internal => pb::ErrorCode::Internal,
        ErrorCode::ApproverRequired => pb::ErrorCode::ApproverRequired,
        ErrorCode::ApprovalNotFound => pb::ErrorCode::ApprovalNotFound,
        ErrorCode::PermissionDenied => pb::ErrorCode::PermissionDenied,
        ErrorCode::ApprovalAlreadyResolved => pb::ErrorCode::ApprovalAlreadyResolved,
        ErrorCode::ApprovalExpired => pb::ErrorCode::ApprovalExpired,
        ErrorCode::CreditUnavailable => pb::ErrorCode::CreditUnavailable,
        ErrorCode::ApprovalNotApproved => pb::ErrorCode::ApprovalNotApproved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_the_same_name_on_the_wire() {
        for code in ErrorCode::ALL {
            let wire = error_code_to_proto(*code).as_str_name();
            assert_eq!(wire.strip_prefix("ERROR_CODE_"), Some(code.as_str()));
        }
    }
}
