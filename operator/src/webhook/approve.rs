//! Approver identity on ApprovalRequests (`POST /approve`, mutating, UPDATE of
//! `approvalrequests/status`).
//!
//! ```text
//! kubectl spendguard approve NAME ─► PATCH approvalrequests/NAME/status {phase: Approved}
//!   ─► assess(old status, new status, user)      pure: admit / authorize / stamp / refuse
//!   ─► SubjectAccessReview(user, verb approve)   only for Approved and Denied
//!   ─► JSONPatch status.decidedBy = userInfo.username, status.decidedAt = now
//! ```
//!
//! The identity always comes from the apiserver's `userInfo`, never from the client: whatever
//! the client put in `decidedBy`/`decidedAt` is overwritten. The status subresource is the only
//! way to change status (the CRD enables it, so the apiserver keeps the old status on updates of
//! the main resource), so this webhook sees every decision. See docs/design/approvals-webhook.md.

use chrono::{DateTime, SecondsFormat, Utc};
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use spendguard_core::plan::TEXT_LEN_MAX;
use spendguard_crds::approval_request::{ApprovalPhase, ApprovalRequestStatus};
use std::time::Duration;
use tracing::{info, warn};

/// The custom RBAC verb an approver needs on `approvalrequests.spendguard.io`.
pub const APPROVE_VERB: &str = "approve";
/// API group of ApprovalRequests.
pub const GROUP: &str = "spendguard.io";
/// Resource name of ApprovalRequests.
pub const RESOURCE: &str = "approvalrequests";
/// Deadline of the SubjectAccessReview; well inside the webhook's 10 s `timeoutSeconds`, so a
/// slow apiserver becomes our clear refusal rather than the apiserver's timeout.
const ACCESS_REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the approvals webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalConfig {
    /// The operator's own username (`system:serviceaccount:<ns>:<sa>`): the only identity that
    /// may set `Expired`, and one that never approves or denies.
    pub operator_username: String,
}

/// A refusal's stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The user may not `approve` ApprovalRequests in this namespace.
    Forbidden,
    /// The request is already decided; a decision never changes.
    AlreadyDecided,
    /// `decidedBy`, `decidedAt` or `decisionReason` set without a decision.
    DecisionFieldsWithoutDecision,
    /// `Expired` set by someone other than the operator.
    ExpiryReserved,
    /// The operator tried to approve or deny.
    OperatorCannotDecide,
    /// A decision without a username to stamp.
    Anonymous,
    /// A username the ledger cannot record as the approver (too long, a control character).
    ApproverUnrecordable,
    /// `status.conditions` written by someone other than the operator.
    ConditionsReserved,
    /// The SubjectAccessReview failed (fail closed).
    AuthorizationFailed,
    /// The status does not deserialize.
    Malformed,
}

impl Code {
    /// Stable code, the first word of every refusal message.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forbidden => "SPENDGUARD_APPROVAL_FORBIDDEN",
            Self::AlreadyDecided => "SPENDGUARD_APPROVAL_ALREADY_DECIDED",
            Self::DecisionFieldsWithoutDecision => "SPENDGUARD_APPROVAL_FIELDS_WITHOUT_DECISION",
            Self::ExpiryReserved => "SPENDGUARD_APPROVAL_EXPIRY_RESERVED",
            Self::OperatorCannotDecide => "SPENDGUARD_APPROVAL_OPERATOR_CANNOT_DECIDE",
            Self::Anonymous => "SPENDGUARD_APPROVAL_ANONYMOUS",
            Self::ApproverUnrecordable => "SPENDGUARD_APPROVAL_APPROVER_UNRECORDABLE",
            Self::ConditionsReserved => "SPENDGUARD_APPROVAL_CONDITIONS_RESERVED",
            Self::AuthorizationFailed => "SPENDGUARD_APPROVAL_AUTHORIZATION_FAILED",
            Self::Malformed => "SPENDGUARD_MALFORMED",
        }
    }
}

/// Why a status write is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Which rule.
    pub code: Code,
    /// For humans (kubectl prints it).
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

/// What to do with one status write, decided from the old and new status and the user alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assessment {
    /// No decision is made or changed (e.g. the operator updating conditions): admit as is.
    Admit,
    /// A human decision: admit only if a SubjectAccessReview allows `approve`, then stamp.
    Authorize(ApprovalPhase),
    /// The operator expiring a pending request: stamp without a review.
    Stamp,
    /// Refuse.
    Refuse(Refusal),
}

fn phase_name(phase: ApprovalPhase) -> &'static str {
    match phase {
        ApprovalPhase::Pending => "Pending",
        ApprovalPhase::Approved => "Approved",
        ApprovalPhase::Denied => "Denied",
        ApprovalPhase::Expired => "Expired",
    }
}

fn refuse(code: Code, message: String) -> Assessment {
    Assessment::Refuse(Refusal { code, message })
}

/// The decision fields of a status, for comparing old and new.
fn decision(
    status: &ApprovalRequestStatus,
) -> (ApprovalPhase, Option<&str>, Option<&str>, Option<&str>) {
    (
        status.phase,
        status.decided_by.as_deref(),
        status.decided_at.as_deref(),
        status.decision_reason.as_deref(),
    )
}

/// Assesses one write of an ApprovalRequest's status. A missing status reads as `Pending` with
/// no decision (what the operator's first write and the CRD default mean).
///
/// # Guarantees
/// - A decided request (Approved, Denied, Expired) never changes phase, `decidedBy`,
///   `decidedAt` or `decisionReason`; anything else in its status (conditions) may change.
/// - Pending moves to Approved or Denied only through [`Assessment::Authorize`], and to Expired
///   only by `config.operator_username` ([`Assessment::Stamp`]); the operator never approves.
/// - A pending request never carries a client-set `decidedBy`, `decidedAt` or
///   `decisionReason`.
/// - Only the operator writes `conditions`.
pub fn assess(
    old: Option<&ApprovalRequestStatus>,
    new: Option<&ApprovalRequestStatus>,
    username: &str,
    config: &ApprovalConfig,
) -> Assessment {
    let empty = ApprovalRequestStatus::default();
    let old = old.unwrap_or(&empty);
    let new = new.unwrap_or(&empty);
    // The conditions are the operator's record of what the ledger did: `Resolved=True` tells
    // it a decision was forwarded. Written by anyone else, they could keep a decision from ever
    // reaching the ledger, and the approval would expire.
    if old.conditions != new.conditions && username != config.operator_username {
        return refuse(
            Code::ConditionsReserved,
            "status.conditions are written by the SpendGuard operator only".into(),
        );
    }
    if old.phase != ApprovalPhase::Pending {
        if decision(old) == decision(new) {
            return Assessment::Admit;
        }
        return refuse(
            Code::AlreadyDecided,
            format!(
                "this ApprovalRequest was already {} by {} at {}; a decision cannot change",
                phase_name(old.phase),
                old.decided_by.as_deref().unwrap_or("unknown"),
                old.decided_at.as_deref().unwrap_or("an unknown time"),
            ),
        );
    }
    match new.phase {
        ApprovalPhase::Pending if decision(old) == decision(new) => Assessment::Admit,
        ApprovalPhase::Pending => refuse(
            Code::DecisionFieldsWithoutDecision,
            "decidedBy, decidedAt and decisionReason are set only together with a decision \
             (phase Approved or Denied), and the webhook stamps decidedBy and decidedAt itself"
                .into(),
        ),
        ApprovalPhase::Expired if username == config.operator_username => Assessment::Stamp,
        ApprovalPhase::Expired => refuse(
            Code::ExpiryReserved,
            format!(
                "only the SpendGuard operator ({}) expires ApprovalRequests; approve or deny \
                 instead",
                config.operator_username
            ),
        ),
        ApprovalPhase::Approved | ApprovalPhase::Denied if username == config.operator_username => {
            refuse(
                Code::OperatorCannotDecide,
                "the SpendGuard operator never approves or denies; a human approver must".into(),
            )
        }
        ApprovalPhase::Approved | ApprovalPhase::Denied if username.is_empty() => refuse(
            Code::Anonymous,
            "a decision needs an authenticated user to record as decidedBy".into(),
        ),
        // Admitted, the decision would reach the ledger, be refused there on every retry, and
        // the approval would expire with nothing said to the approver.
        ApprovalPhase::Approved | ApprovalPhase::Denied
            if spendguard_core::ids::check_text("approver", username, TEXT_LEN_MAX).is_err() =>
        {
            refuse(
                Code::ApproverUnrecordable,
                format!(
                    "the ledger records an approver's username of at most {TEXT_LEN_MAX} bytes \
                     without control characters; this one cannot be recorded, so the decision \
                     is refused: decide as a user with a shorter name"
                ),
            )
        }
        phase @ (ApprovalPhase::Approved | ApprovalPhase::Denied) => Assessment::Authorize(phase),
    }
}

fn add(path: &[&str], value: String) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value: serde_json::Value::String(value),
    })
}

/// The JSONPatch that stamps the decision: `decidedBy` and `decidedAt` are added or replaced
/// (JSONPatch `add` replaces an existing member), so a client-supplied value never survives.
pub fn stamp(username: &str, now: DateTime<Utc>) -> Vec<PatchOperation> {
    vec![
        add(&["status", "decidedBy"], username.to_owned()),
        add(
            &["status", "decidedAt"],
            now.to_rfc3339_opts(SecondsFormat::Secs, true),
        ),
    ]
}

/// The SubjectAccessReview asking whether `user` may `approve` this ApprovalRequest. It carries
/// everything the authorizers see (user, uid, groups, extra), so it answers exactly as RBAC
/// would for the user's own request; the name lets Roles limit approvers with resourceNames.
pub fn access_review(user: &UserInfo, namespace: &str, name: &str) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            uid: user.uid.clone(),
            groups: user.groups.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(RESOURCE.into()),
                verb: Some(APPROVE_VERB.into()),
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    }
}

/// Whether the review allows the decision; any failure to ask refuses (fail closed).
async fn authorize(
    client: &kube::Client,
    user: &UserInfo,
    namespace: &str,
    name: &str,
) -> Result<(), Refusal> {
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let review = access_review(user, namespace, name);
    let created = tokio::time::timeout(
        ACCESS_REVIEW_TIMEOUT,
        api.create(&PostParams::default(), &review),
    )
    .await;
    let status = match created {
        Ok(Ok(answer)) => answer.status.unwrap_or_default(),
        Ok(Err(error)) => {
            warn!(%error, namespace, name, "subject access review failed");
            return Err(Refusal {
                code: Code::AuthorizationFailed,
                message: format!(
                    "could not check whether this user may approve (refusing to decide \
                     unchecked): {error}"
                ),
            });
        }
        Err(_) => {
            warn!(namespace, name, "subject access review timed out");
            return Err(Refusal {
                code: Code::AuthorizationFailed,
                message: format!(
                    "checking whether this user may approve timed out after {} s (refusing to \
                     decide unchecked)",
                    ACCESS_REVIEW_TIMEOUT.as_secs()
                ),
            });
        }
    };
    if status.allowed {
        return Ok(());
    }
    let username = user.username.as_deref().unwrap_or_default();
    let mut message = format!(
        "user \"{username}\" may not approve or deny ApprovalRequests in namespace \
         \"{namespace}\": it needs the RBAC verb \"{APPROVE_VERB}\" on \
         \"{RESOURCE}.{GROUP}\""
    );
    if let Some(reason) = status.reason.filter(|r| !r.is_empty()) {
        message.push_str(&format!(" ({reason})"));
    }
    if let Some(error) = status.evaluation_error.filter(|e| !e.is_empty()) {
        message.push_str(&format!(" (evaluation error: {error})"));
    }
    Err(Refusal {
        code: Code::Forbidden,
        message,
    })
}

fn status_of(object: Option<&DynamicObject>) -> Result<Option<ApprovalRequestStatus>, Refusal> {
    match object.and_then(|o| o.data.get("status")) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(status) => serde_json::from_value(status.clone())
            .map(Some)
            .map_err(|e| Refusal {
                code: Code::Malformed,
                message: format!("status is not an ApprovalRequest status: {e}"),
            }),
    }
}

/// The response to one admission request for `approvalrequests/status`.
///
/// Only UPDATEs of the status subresource are judged: the configuration routes nothing else
/// here, and the apiserver discards status changes made through the main resource.
pub async fn admit(
    client: &kube::Client,
    config: &ApprovalConfig,
    request: &AdmissionRequest<DynamicObject>,
    now: DateTime<Utc>,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    if request.kind.kind != "ApprovalRequest" {
        // The configuration routes only ApprovalRequests here; anything else is let through.
        warn!(kind = %request.kind.kind, "approvals webhook called for an unexpected kind");
        return response;
    }
    if request.operation != Operation::Update || request.sub_resource.as_deref() != Some("status") {
        return response;
    }
    let namespace = request.namespace.as_deref().unwrap_or_default();
    let name = request.name.as_str();
    let username = request.user_info.username.as_deref().unwrap_or_default();
    let statuses = status_of(request.old_object.as_ref())
        .and_then(|old| Ok((old, status_of(request.object.as_ref())?)));
    let assessment = match &statuses {
        Ok((old, new)) => assess(old.as_ref(), new.as_ref(), username, config),
        Err(refusal) => Assessment::Refuse(refusal.clone()),
    };
    let decided = match assessment {
        Assessment::Admit => return response,
        Assessment::Refuse(refusal) => Err(refusal),
        Assessment::Stamp => Ok(ApprovalPhase::Expired),
        Assessment::Authorize(phase) => authorize(client, &request.user_info, namespace, name)
            .await
            .map(|()| phase),
    };
    let phase = match decided {
        Ok(phase) => phase,
        Err(refusal) => {
            info!(
                namespace,
                name,
                user = username,
                code = refusal.code.as_str(),
                "refusing approval write"
            );
            return response.deny(refusal.to_string());
        }
    };
    info!(
        namespace,
        name,
        user = username,
        phase = phase_name(phase),
        "approval decided"
    );
    match response.with_patch(json_patch::Patch(stamp(username, now))) {
        Ok(patched) => patched,
        // Fail closed: a decision without the stamped identity is not admitted.
        Err(e) => AdmissionResponse::from(request).deny(format!(
            "{}: could not encode the identity patch: {e}",
            Code::Malformed.as_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use serde_json::json;

    const OPERATOR: &str = "system:serviceaccount:spendguard-system:spendguard-operator";

    fn config() -> ApprovalConfig {
        ApprovalConfig {
            operator_username: OPERATOR.into(),
        }
    }

    fn status(value: serde_json::Value) -> ApprovalRequestStatus {
        serde_json::from_value(value).unwrap()
    }

    fn pending() -> ApprovalRequestStatus {
        status(json!({"phase": "Pending"}))
    }

    fn approved() -> ApprovalRequestStatus {
        status(json!({
            "phase": "Approved",
            "decidedBy": "approver",
            "decidedAt": "2026-11-25T18:00:00Z",
            "decisionReason": "known batch job",
        }))
    }

    fn refusal_code(assessment: &Assessment) -> Code {
        match assessment {
            Assessment::Refuse(refusal) => refusal.code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_human_decision_on_a_pending_request_needs_authorization() {
        // Goal: Pending (or no status yet) to Approved/Denied always goes through the review,
        // whatever the client claims in decidedBy.
        let config = config();
        let approve = status(json!({"phase": "Approved", "decisionReason": "ok"}));
        let deny = status(json!({"phase": "Denied"}));
        let claimed = status(json!({
            "phase": "Approved", "decidedBy": "admin", "decidedAt": "2000-01-01T00:00:00Z"
        }));
        assert_eq!(
            assess(Some(&pending()), Some(&approve), "approver", &config),
            Assessment::Authorize(ApprovalPhase::Approved)
        );
        assert_eq!(
            assess(Some(&pending()), Some(&deny), "approver", &config),
            Assessment::Authorize(ApprovalPhase::Denied)
        );
        assert_eq!(
            assess(None, Some(&approve), "approver", &config),
            Assessment::Authorize(ApprovalPhase::Approved)
        );
        assert_eq!(
            assess(Some(&pending()), Some(&claimed), "approver", &config),
            Assessment::Authorize(ApprovalPhase::Approved)
        );
    }

    #[test]
    fn writes_that_decide_nothing_are_admitted() {
        let config = config();
        let with_condition = status(json!({
            "phase": "Pending",
            "conditions": [{"type": "Mirrored", "status": "True", "reason": "Ok",
                            "message": "", "lastTransitionTime": "2026-11-25T18:00:00Z"}],
        }));
        // The operator's first write, and later condition updates.
        assert_eq!(
            assess(None, Some(&pending()), OPERATOR, &config),
            Assessment::Admit
        );
        assert_eq!(assess(None, None, "anyone", &config), Assessment::Admit);
        assert_eq!(
            assess(Some(&pending()), Some(&with_condition), OPERATOR, &config),
            Assessment::Admit
        );
        // A decided request may still get conditions, as long as its decision stays.
        let mut approved_with_condition = approved();
        approved_with_condition.conditions = with_condition.conditions;
        assert_eq!(
            assess(
                Some(&approved()),
                Some(&approved_with_condition),
                OPERATOR,
                &config
            ),
            Assessment::Admit
        );
    }

    #[test]
    fn only_the_operator_writes_conditions() {
        let config = config();
        let resolved = json!([{"type": "Resolved", "status": "True", "reason": "LedgerResolved",
                               "message": "m", "lastTransitionTime": "2026-11-25T18:00:00Z"}]);
        for (old, new) in [
            (
                pending(),
                status(json!({"phase": "Pending", "conditions": resolved})),
            ),
            (
                pending(),
                status(json!({"phase": "Approved", "conditions": resolved})),
            ),
            (approved(), {
                let mut forged = approved();
                forged.conditions = status(json!({"conditions": resolved})).conditions;
                forged
            }),
        ] {
            assert_eq!(
                refusal_code(&assess(Some(&old), Some(&new), "approver", &config)),
                Code::ConditionsReserved,
                "{new:?}"
            );
        }
        let written = status(json!({"phase": "Pending", "conditions": resolved}));
        assert!(matches!(
            assess(Some(&pending()), Some(&written), OPERATOR, &config),
            Assessment::Admit
        ));
    }

    #[test]
    fn a_username_the_ledger_cannot_record_cannot_decide() {
        let config = config();
        let decided = status(json!({"phase": "Approved"}));
        for username in ["a".repeat(TEXT_LEN_MAX + 1), "oidc:ann\u{7}".to_owned()] {
            assert_eq!(
                refusal_code(&assess(
                    Some(&pending()),
                    Some(&decided),
                    &username,
                    &config
                )),
                Code::ApproverUnrecordable,
                "{username:?}"
            );
        }
        let Assessment::Refuse(refusal) = assess(
            Some(&pending()),
            Some(&decided),
            &"a".repeat(TEXT_LEN_MAX + 1),
            &config,
        ) else {
            panic!("refused");
        };
        assert!(
            refusal
                .message
                .contains("bytes without control characters; this one"),
            "{}",
            refusal.message
        );
        assert!(matches!(
            assess(
                Some(&pending()),
                Some(&decided),
                &"a".repeat(TEXT_LEN_MAX),
                &config
            ),
            Assessment::Authorize(ApprovalPhase::Approved)
        ));
    }

    #[test]
    fn decision_fields_cannot_be_set_without_a_decision() {
        let config = config();
        for fields in [
            json!({"phase": "Pending", "decidedBy": "admin"}),
            json!({"phase": "Pending", "decidedAt": "2026-11-25T18:00:00Z"}),
            json!({"phase": "Pending", "decisionReason": "because"}),
            json!({"decidedBy": "admin"}),
        ] {
            let assessment = assess(
                Some(&pending()),
                Some(&status(fields.clone())),
                "approver",
                &config,
            );
            assert_eq!(
                refusal_code(&assessment),
                Code::DecisionFieldsWithoutDecision,
                "{fields}"
            );
        }
    }

    #[test]
    fn a_decided_request_never_changes_its_decision() {
        let config = config();
        let changes = [
            json!({"phase": "Denied", "decidedBy": "approver", "decidedAt": "2026-11-25T18:00:00Z",
                   "decisionReason": "known batch job"}),
            json!({"phase": "Approved", "decidedBy": "admin", "decidedAt": "2026-11-25T18:00:00Z",
                   "decisionReason": "known batch job"}),
            json!({"phase": "Approved", "decidedBy": "approver", "decidedAt": "2027-01-01T00:00:00Z",
                   "decisionReason": "known batch job"}),
            json!({"phase": "Approved", "decidedBy": "approver", "decidedAt": "2026-11-25T18:00:00Z"}),
            json!({"phase": "Pending"}),
        ];
        for change in changes {
            for user in ["approver", "admin", OPERATOR] {
                let assessment = assess(
                    Some(&approved()),
                    Some(&status(change.clone())),
                    user,
                    &config,
                );
                let Assessment::Refuse(refusal) = assessment else {
                    panic!("{change} by {user} must be refused");
                };
                assert_eq!(refusal.code, Code::AlreadyDecided);
                assert!(
                    refusal
                        .message
                        .contains("already Approved by approver at 2026-11-25T18:00:00Z"),
                    "{}",
                    refusal.message
                );
            }
        }
        // Removing the status of a decided request would erase the decision.
        assert_eq!(
            refusal_code(&assess(Some(&approved()), None, "admin", &config)),
            Code::AlreadyDecided
        );
        // Expired is final too, and an old record without an identity still reads clearly.
        let expired = status(json!({"phase": "Expired"}));
        let assessment = assess(
            Some(&expired),
            Some(&status(json!({"phase": "Approved"}))),
            "approver",
            &config,
        );
        let Assessment::Refuse(refusal) = assessment else {
            panic!("an expired request cannot be approved");
        };
        assert_eq!(refusal.code, Code::AlreadyDecided);
        assert!(
            refusal
                .message
                .contains("already Expired by unknown at an unknown time")
        );
    }

    #[test]
    fn only_the_operator_expires_and_it_never_decides() {
        let config = config();
        let expire = status(json!({"phase": "Expired"}));
        assert_eq!(
            assess(Some(&pending()), Some(&expire), OPERATOR, &config),
            Assessment::Stamp
        );
        assert_eq!(
            refusal_code(&assess(
                Some(&pending()),
                Some(&expire),
                "approver",
                &config
            )),
            Code::ExpiryReserved
        );
        for phase in ["Approved", "Denied"] {
            let decide = status(json!({"phase": phase}));
            assert_eq!(
                refusal_code(&assess(Some(&pending()), Some(&decide), OPERATOR, &config)),
                Code::OperatorCannotDecide
            );
        }
    }

    #[test]
    fn a_decision_needs_a_username() {
        let decide = status(json!({"phase": "Approved"}));
        assert_eq!(
            refusal_code(&assess(Some(&pending()), Some(&decide), "", &config())),
            Code::Anonymous
        );
    }

    #[test]
    fn the_stamp_overwrites_whatever_the_client_claimed() {
        // Goal: the JSONPatch replaces a client-supplied identity and adds a missing one.
        let now = DateTime::parse_from_rfc3339("2026-11-25T18:30:05.123Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut claimed = json!({"status": {"phase": "Approved", "decidedBy": "admin",
                                            "decidedAt": "2000-01-01T00:00:00Z"}});
        json_patch::patch(&mut claimed, &stamp("approver", now)).unwrap();
        assert_eq!(
            claimed,
            json!({"status": {"phase": "Approved", "decidedBy": "approver",
                              "decidedAt": "2026-11-25T18:30:05Z"}})
        );
        let mut bare = json!({"status": {"phase": "Denied"}});
        json_patch::patch(&mut bare, &stamp("approver", now)).unwrap();
        assert_eq!(bare["status"]["decidedBy"], "approver");
        assert_eq!(bare["status"]["decidedAt"], "2026-11-25T18:30:05Z");
    }

    #[test]
    fn the_access_review_carries_the_whole_identity() {
        let user = UserInfo {
            username: Some("approver".into()),
            uid: Some("uid-1".into()),
            groups: Some(vec![
                "spendguard:approvers".into(),
                "system:authenticated".into(),
            ]),
            extra: Some([("scopes".to_owned(), vec!["a".to_owned()])].into()),
        };
        let review = access_review(&user, "team", "call-1");
        assert_eq!(review.spec.user.as_deref(), Some("approver"));
        assert_eq!(review.spec.uid.as_deref(), Some("uid-1"));
        assert_eq!(review.spec.groups, user.groups);
        assert_eq!(review.spec.extra, user.extra);
        let attributes = review.spec.resource_attributes.unwrap();
        assert_eq!(attributes.group.as_deref(), Some("spendguard.io"));
        assert_eq!(attributes.resource.as_deref(), Some("approvalrequests"));
        assert_eq!(attributes.verb.as_deref(), Some("approve"));
        assert_eq!(attributes.namespace.as_deref(), Some("team"));
        assert_eq!(attributes.name.as_deref(), Some("call-1"));
        assert_eq!(attributes.subresource, None);
    }

    #[test]
    fn a_malformed_status_is_refused() {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "spendguard.io/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"name": "x"}, "status": {"phase": "Maybe"},
        }))
        .unwrap();
        assert_eq!(status_of(Some(&object)).unwrap_err().code, Code::Malformed);
        let bare: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "spendguard.io/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"name": "x"},
        }))
        .unwrap();
        assert_eq!(status_of(Some(&bare)).unwrap(), None);
        assert_eq!(status_of(None).unwrap(), None);
    }

    #[test]
    fn codes_are_distinct() {
        let codes = [
            Code::Forbidden,
            Code::AlreadyDecided,
            Code::DecisionFieldsWithoutDecision,
            Code::ExpiryReserved,
            Code::OperatorCannotDecide,
            Code::Anonymous,
            Code::AuthorizationFailed,
            Code::Malformed,
        ];
        let names: std::collections::BTreeSet<_> = codes.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), codes.len());
    }
}
