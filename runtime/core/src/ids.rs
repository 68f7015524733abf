//! Identifier grammars. Every id that reaches SQL or an audit event passed through here.
//!
//! Names follow Kubernetes object naming closely enough that a CR's name can be an id:
//! lowercase alphanumerics plus `-`, `.`, `_`, `:`, `/`, starting and ending alphanumeric.

use crate::error::LedgerError;
use uuid::Uuid;

/// Longest tenant, budget, scope or workload id.
pub const NAME_LEN_MAX: usize = 253;
/// Longest idempotency key.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 200;

/// The longest call id an approval may be asked under: the call resumes under
/// `<call id>/approved/<approval id>` (`plan::resume_key`), which must fit an idempotency key.
pub const APPROVAL_CALL_ID_LEN_MAX: usize = IDEMPOTENCY_KEY_LEN_MAX - "/approved/".len() - 36;

/// Checks a tenant, budget, scope or workload instance id.
///
/// # Errors
/// [`LedgerError::IdMalformed`] naming `field`.
pub fn check_name(field: &'static str, value: &str) -> Result<(), LedgerError> {
    let malformed = |reason: &str| LedgerError::IdMalformed {
        field,
        reason: reason.to_owned(),
    };
    if value.is_empty() {
        return Err(malformed("empty"));
    }
    if value.len() > NAME_LEN_MAX {
        return Err(malformed("longer than 253 characters"));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._:/".contains(c);
    if !value.chars().all(allowed) {
        return Err(malformed("only a-z, 0-9 and - . _ : / are allowed"));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !alnum(value.chars().next()) || !alnum(value.chars().last()) {
        return Err(malformed("must start and end with a-z or 0-9"));
    }
    Ok(())
}

/// Checks an idempotency key: 1 to 200 visible ASCII characters.
///
/// # Errors
/// [`LedgerError::IdMalformed`] naming `field`.
pub fn check_idempotency_key(field: &'static str, value: &str) -> Result<(), LedgerError> {
    let ok = !value.is_empty()
        && value.len() <= IDEMPOTENCY_KEY_LEN_MAX
        && value.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(LedgerError::IdMalformed {
            field,
            reason: "must be 1 to 200 visible ASCII characters".to_owned(),
        })
    }
}

/// Parses a reservation id (a UUID in hyphenated form).
///
/// # Errors
/// [`LedgerError::IdMalformed`] naming `field`.
pub fn parse_reservation_id(field: &'static str, value: &str) -> Result<Uuid, LedgerError> {
    Uuid::try_parse(value).map_err(|_| LedgerError::IdMalformed {
        field,
        reason: "must be a UUID".to_owned(),
    })
}

/// Checks a free-text field's length (context, reasons, display names).
///
/// # Errors
/// [`LedgerError::RequestTooLarge`] naming `field`.
pub fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), LedgerError> {
    if value.len() > max {
        return Err(LedgerError::RequestTooLarge {
            field,
            len: value.len(),
            max,
        });
    }
    if value.chars().any(char::is_control) {
        return Err(LedgerError::InvalidArgument {
            field,
            reason: "control characters are not allowed".to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "tenant-a", "team.x/run:1", "a_b", "0"] {
            assert!(check_name("f", ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "-a", "a-", "a b", "é", "a\n", &"a".repeat(254)] {
            let err = check_name("f", bad).unwrap_err();
            assert_eq!(err.code(), crate::ErrorCode::IdMalformed, "{bad}");
        }
    }

    #[test]
    fn idempotency_keys() {
        assert!(check_idempotency_key("k", "call-1:ABC_x").is_ok());
        assert!(check_idempotency_key("k", "").is_err());
        assert!(check_idempotency_key("k", "a b").is_err());
        assert!(check_idempotency_key("k", &"k".repeat(201)).is_err());
        // The longest call id an approval takes still resumes under a valid key, exactly full.
        let resumed = crate::plan::resume_key(
            &"c".repeat(APPROVAL_CALL_ID_LEN_MAX),
            &uuid::Uuid::new_v4().to_string(),
        );
        assert_eq!(resumed.len(), IDEMPOTENCY_KEY_LEN_MAX);
        assert!(check_idempotency_key("k", &resumed).is_ok());
    }

    #[test]
    fn reservation_ids() {
        assert!(parse_reservation_id("r", "67e55044-10b1-426f-9247-bb680e5fe0c8").is_ok());
        assert!(parse_reservation_id("r", "not-a-uuid").is_err());
    }

    #[test]
    fn text() {
        assert!(check_text("t", "fine", 10).is_ok());
        assert_eq!(
            check_text("t", "too long!!!", 10).unwrap_err().code(),
            crate::ErrorCode::RequestTooLarge
        );
        assert_eq!(
            check_text("t", "a\u{0}", 10).unwrap_err().code(),
            crate::ErrorCode::InvalidArgument
        );
    }
}
