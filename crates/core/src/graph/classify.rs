//! Meta's error codes mapped to what the fleet does about them. One table-driven function, tested
//! on its own, so that "is this worth retrying?" has exactly one answer everywhere.

/// What a failed Graph call means for the shard or export that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying with backoff: 5xx, timeouts, codes 1 and 2, `is_transient`.
    Transient,
    /// Over a rate limit: pause the ad account and retry later.
    Throttled,
    /// Temporarily blocked (368): wait and retry later.
    Blocked,
    /// The token is dead: stop all work on the connection, ask for a reconnect.
    TokenInvalid,
    /// The user lost access to the ad account or a permission.
    PermissionLost,
    /// The Custom Audience terms of the ad account are not accepted.
    TermsNotAccepted,
    /// The audience was deleted or is not shared with the caller.
    AudienceGone,
    /// The request itself is wrong; retrying cannot help.
    BadRequest,
}

impl ErrorClass {
    /// Whether the same request may succeed later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorClass::Transient | ErrorClass::Throttled | ErrorClass::Blocked
        )
    }

    /// Bounded label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Throttled => "throttled",
            ErrorClass::Blocked => "blocked",
            ErrorClass::TokenInvalid => "token_invalid",
            ErrorClass::PermissionLost => "permission_lost",
            ErrorClass::TermsNotAccepted => "terms_not_accepted",
            ErrorClass::AudienceGone => "audience_gone",
            ErrorClass::BadRequest => "bad_request",
        }
    }
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 8] = [
        ErrorClass::Transient,
        ErrorClass::Throttled,
        ErrorClass::Blocked,
        ErrorClass::TokenInvalid,
        ErrorClass::PermissionLost,
        ErrorClass::TermsNotAccepted,
        ErrorClass::AudienceGone,
        ErrorClass::BadRequest,
    ];
}

/// What one Graph call came to, for metrics: `ok`, or the class of its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    Failed(ErrorClass),
}

impl crate::telemetry::Label for CallOutcome {
    const ALL: &'static [CallOutcome] = &[
        CallOutcome::Ok,
        CallOutcome::Failed(ErrorClass::Transient),
        CallOutcome::Failed(ErrorClass::Throttled),
        CallOutcome::Failed(ErrorClass::Blocked),
        CallOutcome::Failed(ErrorClass::TokenInvalid),
        CallOutcome::Failed(ErrorClass::PermissionLost),
        CallOutcome::Failed(ErrorClass::TermsNotAccepted),
        CallOutcome::Failed(ErrorClass::AudienceGone),
        CallOutcome::Failed(ErrorClass::BadRequest),
    ];
    fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Failed(class) => class.as_str(),
        }
    }
}

/// Classifies a Graph error envelope. `http_status` matters only when Meta's code says nothing
/// more specific: throttling arrives as HTTP 400, so status alone is never trusted.
pub fn classify(
    http_status: u16,
    code: Option<i64>,
    subcode: Option<i64>,
    is_transient: bool,
) -> ErrorClass {
    use ErrorClass::*;
    match (code, subcode) {
        (Some(190 | 102), _) => TokenInvalid,
        (Some(4 | 17 | 32 | 613 | 341), _) | (Some(80_000..=80_014), _) => Throttled,
        (Some(368), _) => Blocked,
        (Some(1 | 2), _) => Transient,
        // Two documented subcodes of 200 are not about access (Meta's Marketing API error
        // reference): 1870034 is the Custom Audience terms, 1870047 a removal that would leave
        // the audience too small. Every other 10 and 200-299 is: the ad account is marked
        // unusable on it (`revocation`), so these two must not pass for it.
        (Some(200), Some(1_870_034)) => TermsNotAccepted,
        (Some(200), Some(1_870_047)) => BadRequest,
        (Some(10 | 200..=299), _) => PermissionLost,
        (Some(2655 | 2663), _) | (_, Some(1_870_090)) => TermsNotAccepted,
        (Some(100), Some(33 | 1_487_366 | 1_487_301)) => AudienceGone,
        _ if is_transient => Transient,
        (Some(_), _) if http_status < 500 => BadRequest,
        _ if http_status >= 500 || http_status == 0 => Transient,
        _ => BadRequest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorClass::*;

    #[test]
    fn meta_codes_map_to_their_class() {
        // (HTTP status, code, subcode, is_transient, expected class)
        type Case = (u16, Option<i64>, Option<i64>, bool, ErrorClass);
        let table: &[Case] = &[
            (400, Some(190), Some(460), false, TokenInvalid),
            (400, Some(190), Some(463), false, TokenInvalid),
            (400, Some(102), None, false, TokenInvalid),
            (400, Some(4), None, false, Throttled),
            (400, Some(17), Some(2_446_079), false, Throttled),
            (400, Some(32), None, false, Throttled),
            (400, Some(613), Some(1_487_742), false, Throttled),
            (400, Some(80_003), None, false, Throttled),
            (400, Some(80_004), None, false, Throttled),
            (400, Some(341), None, false, Throttled),
            (400, Some(368), None, false, Blocked),
            (500, Some(1), None, true, Transient),
            (400, Some(2), None, false, Transient),
            (400, Some(10), None, false, PermissionLost),
            (403, Some(200), None, false, PermissionLost),
            (400, Some(294), None, false, PermissionLost),
            (400, Some(273), None, false, PermissionLost),
            (400, Some(200), Some(1_885_016), false, PermissionLost),
            (400, Some(200), Some(1_870_034), false, TermsNotAccepted),
            (400, Some(200), Some(1_870_047), false, BadRequest),
            (400, Some(2655), None, false, TermsNotAccepted),
            (400, Some(100), Some(1_870_090), false, TermsNotAccepted),
            (400, Some(100), Some(33), false, AudienceGone),
            (400, Some(100), Some(1_487_366), false, AudienceGone),
            (400, Some(100), None, false, BadRequest),
            (400, Some(2635), None, false, BadRequest),
            (400, Some(2650), Some(1_713_230), false, BadRequest),
            (400, Some(100), None, true, Transient),
            (502, None, None, false, Transient),
            (0, None, None, false, Transient),
            (404, None, None, false, BadRequest),
        ];
        for &(status, code, subcode, transient, expected) in table {
            assert_eq!(
                classify(status, code, subcode, transient),
                expected,
                "status {status} code {code:?} subcode {subcode:?}"
            );
        }
    }

    #[test]
    fn every_class_is_a_call_outcome_once() {
        use crate::telemetry::Label;
        for class in ErrorClass::ALL {
            let n = CallOutcome::ALL
                .iter()
                .filter(|o| **o == CallOutcome::Failed(class))
                .count();
            assert_eq!(n, 1, "{class:?}");
        }
    }

    #[test]
    fn only_waiting_classes_are_retryable() {
        assert!(Transient.is_retryable() && Throttled.is_retryable() && Blocked.is_retryable());
        for c in [
            TokenInvalid,
            PermissionLost,
            TermsNotAccepted,
            AudienceGone,
            BadRequest,
        ] {
            assert!(!c.is_retryable(), "{c:?}");
        }
    }
}
