//! Meta's error answers: `GraphFailure` (HTTP status plus the `{"error": {...}}` envelope) and
//! one named constructor per documented error the emulator returns, so each path says which
//! answer it gives (`GraphFailure::token_invalid(463)`, not `new(400, 190, Some(463), ...)`).
//! The codes, subcodes, statuses and messages are those of `shared/reference/graph-api.md`; this
//! module must never decide *when* an error applies: that is the rule modules' job.

use serde_json::{json, Value};

/// A Graph error answer: HTTP status and Meta's envelope.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct GraphFailure {
    pub http: u16,
    pub code: i64,
    pub subcode: Option<i64>,
    pub kind: &'static str,
    pub message: String,
    pub transient: bool,
    /// An HTML body instead of JSON.
    pub html: bool,
}

impl GraphFailure {
    /// Private on purpose: every answer goes through a constructor named for what it is.
    fn new(
        http: u16,
        code: i64,
        subcode: Option<i64>,
        kind: &'static str,
        message: impl Into<String>,
    ) -> Self {
        GraphFailure {
            http,
            code,
            subcode,
            kind,
            message: message.into(),
            transient: false,
            html: false,
        }
    }

    /// Marks the failure `is_transient`, as Meta does for errors worth retrying.
    fn transient(mut self) -> Self {
        self.transient = true;
        self
    }

    // Requests Meta cannot serve as asked (code 100 and kin): permanent.

    /// Code 2635: a version outside the accepted range.
    pub fn deprecated_version(version: &str) -> Self {
        Self::new(
            400,
            2635,
            None,
            "OAuthException",
            format!("(#2635) You are calling a deprecated or unknown version of the Graph API ({version}). Please update to the latest version."),
        )
    }

    /// Code 100: a parameter that is missing or malformed.
    pub fn bad_param(name: &str) -> Self {
        Self::new(
            400,
            100,
            None,
            "OAuthException",
            format!("(#100) The parameter {name} is required or invalid"),
        )
    }

    /// Code 100 on a whole add-users request because of one entry in it: nothing of the
    /// request is applied. (Meta documents such refusals for malformed payloads without saying
    /// which record; the message here never names the entry either.)
    pub fn payload_refused(_entry: &str) -> Self {
        Self::new(
            400,
            100,
            None,
            "OAuthException",
            "(#100) Invalid parameter: the payload holds data that cannot be processed",
        )
    }

    /// Code 100: a `fields` entry the node type does not have.
    pub fn nonexisting_field(field: &str, node_type: &str) -> Self {
        Self::new(
            400,
            100,
            None,
            "OAuthException",
            format!(
                "(#100) Tried accessing nonexisting field ({field}) on node type ({node_type})"
            ),
        )
    }

    /// Code 100 subcode 33: an object that does not exist or that the token may not see. The
    /// message says "post" whatever the method, as the emulator always has for audiences.
    pub fn missing_object(id: &str) -> Self {
        Self::unsupported("post", id)
    }

    /// Code 100 subcode 33 for a method or path the object does not support.
    pub fn unsupported(method: &str, node: &str) -> Self {
        Self::new(
            400,
            100,
            Some(33),
            "GraphMethodException",
            format!("Unsupported {method} request. Object with ID '{node}' does not exist, cannot be loaded due to missing permissions, or does not support this operation."),
        )
    }

    /// Code 100: more than 10,000 records in one add- or remove-users request.
    pub fn too_many_entries(received: usize) -> Self {
        Self::new(
            400,
            100,
            None,
            "OAuthException",
            format!("(#100) Too many entries in one request: {received} (at most 10000)"),
        )
    }

    /// Code 100: a payload without records.
    pub fn empty_data() -> Self {
        Self::new(
            400,
            100,
            None,
            "OAuthException",
            "(#100) The data parameter is empty",
        )
    }

    /// Code 100: a payload `schema` key Meta does not know.
    pub fn invalid_schema_key(key: &str) -> Self {
        Self::new(
            400,
            100,
            None,
            "OAuthException",
            format!("(#100) Invalid schema key: {key}"),
        )
    }

    /// Code 2654 subcode 1713007: a lookalike whose origin has fewer than 100 people.
    pub fn lookalike_source_too_small() -> Self {
        Self::new(
            400,
            2654,
            Some(1_713_007),
            "OAuthException",
            "(#2654) The source audience must contain at least 100 people.",
        )
    }

    // Tokens and the app's credentials.

    /// Code 104: no token at all.
    pub fn token_missing() -> Self {
        Self::new(
            400,
            104,
            None,
            "OAuthException",
            "An access token is required to request this resource.",
        )
    }

    /// Code 190 without a subcode: a token Meta cannot read (unknown, or not a token at all).
    pub fn token_unparseable() -> Self {
        Self::new(
            400,
            190,
            None,
            "OAuthException",
            "Invalid OAuth access token - Cannot parse access token",
        )
    }

    /// Code 190 with the subcode of a revoked token (458 app removed, 460 password changed, 463
    /// expired, ...), with Meta's message for it.
    pub fn token_invalid(subcode: i64) -> Self {
        let message = match subcode {
            458 => "Error validating access token: The user has not authorized application.",
            460 => "Error validating access token: The session has been invalidated because the user changed their password or Facebook has changed the session for security reasons.",
            463 => "Error validating access token: Session has expired.",
            _ => "Error validating access token: The session is invalid.",
        };
        Self::new(400, 190, Some(subcode), "OAuthException", message)
    }

    /// Code 100: an `appsecret_proof` that does not match the token.
    pub fn appsecret_proof_invalid() -> Self {
        Self::new(
            400,
            100,
            None,
            "GraphMethodException",
            "Invalid appsecret_proof provided in the API argument",
        )
    }

    /// Code 100: no `appsecret_proof` where the app requires one.
    pub fn appsecret_proof_missing() -> Self {
        Self::new(
            400,
            100,
            None,
            "GraphMethodException",
            "API calls from the server require an appsecret_proof argument",
        )
    }

    /// Code 101: an OAuth exchange with the wrong app id or secret.
    pub fn client_secret_invalid() -> Self {
        Self::new(
            400,
            101,
            None,
            "OAuthException",
            "Error validating client secret.",
        )
    }

    /// Code 100 subcode 36007: an OAuth code exchanged twice, or never issued.
    pub fn auth_code_used() -> Self {
        Self::new(
            400,
            100,
            Some(36007),
            "OAuthException",
            "This authorization code has expired or has been used.",
        )
    }

    /// Code 100 subcode 36008: an OAuth code exchanged with another `redirect_uri` than the
    /// dialog's.
    pub fn redirect_uri_mismatch() -> Self {
        Self::new(
            400,
            100,
            Some(36008),
            "OAuthException",
            "Error validating verification code. Please make sure your redirect_uri is identical to the one you used in the OAuth dialog request",
        )
    }

    // Ad accounts.

    /// Code 200 ("Permissions error" in Meta's Marketing API error reference), type
    /// `OAuthException`: the token may not use the ad account (never granted, or its access
    /// removed from the account or its Business Manager), or the account does not exist. Calls
    /// on the account's audiences answer `missing_object` instead (code 100 subcode 33, which
    /// the same reference gives for a token without permissions on the ad account that owns the
    /// audience).
    pub fn permission_denied(ad_account: &str) -> Self {
        Self::new(
            400,
            200,
            None,
            "OAuthException",
            format!("(#200) The user does not have permission to manage ad account act_{ad_account}, or it does not exist."),
        )
    }

    /// A disabled ad account. *Unconfirmed*: Meta documents `account_status` 2 (DISABLED) on
    /// the ad account, not the error its calls answer. Code 200 as for any permission error,
    /// subcode 1885016, which a third-party decoder of Meta's ads errors names "Ad Account
    /// Disabled" (`revocation::DISABLED_SUBCODE`).
    pub fn ad_account_disabled(ad_account: &str) -> Self {
        Self::new(
            400,
            200,
            Some(1_885_016),
            "OAuthException",
            format!("(#200) Ad account act_{ad_account} is disabled."),
        )
    }

    /// Code 2655 subcode 1870090: the Custom Audience terms are not accepted; the message holds
    /// the acceptance link.
    pub fn terms_not_accepted(ad_account: &str) -> Self {
        Self::new(
            400,
            2655,
            Some(1_870_090),
            "OAuthException",
            format!("(#2655) You must accept the Custom Audience terms: https://business.facebook.com/ads/manage/customaudiences/tos/?act={ad_account}"),
        )
    }

    // Rate limits: HTTP 400, as Meta throttles. The time to regain access travels in the usage
    // headers, not in the error.

    /// Code 80003: the ad account's custom-audience budget is spent.
    pub fn throttled_ad_account() -> Self {
        Self::new(
            400,
            80003,
            None,
            "OAuthException",
            "(#80003) There have been too many calls to this ad-account. Wait a bit and try again.",
        )
    }

    /// Code 17 subcode 2446079: the token's user-level budget is spent.
    pub fn throttled_user() -> Self {
        Self::new(
            400,
            17,
            Some(2_446_079),
            "OAuthException",
            "(#17) User request limit reached",
        )
    }

    // Transient failures (faults).

    /// HTTP 500 code 1, `is_transient`.
    pub fn unknown_error() -> Self {
        Self::new(500, 1, None, "OAuthException", "An unknown error occurred").transient()
    }

    /// Code 2, `is_transient`: Meta's service is briefly unavailable.
    pub fn temporarily_unavailable() -> Self {
        Self::new(
            400,
            2,
            None,
            "OAuthException",
            "An unexpected error has occurred. Please retry your request later.",
        )
        .transient()
    }

    /// HTTP 502 with an HTML page, as a proxy in front of Meta answers.
    pub fn html_bad_gateway() -> Self {
        let mut f = Self::new(
            502,
            0,
            None,
            "",
            "<html><body>502 Bad Gateway</body></html>",
        );
        f.html = true;
        f
    }

    /// Whatever error a test scripted (`Fault::Error`), as an `OAuthException`.
    pub fn scripted(http: u16, code: i64, subcode: Option<i64>, message: &str) -> Self {
        Self::new(http, code, subcode, "OAuthException", message)
    }

    pub fn envelope(&self) -> Value {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "code": self.code,
            "is_transient": self.transient,
            "fbtrace_id": "AEmulatorTrace",
        });
        if let Some(sub) = self.subcode {
            error["error_subcode"] = json!(sub);
            error["error_user_title"] = json!("Request failed");
            error["error_user_msg"] = json!(self.message);
        }
        json!({ "error": error })
    }
}

#[cfg(test)]
mod tests {
    use super::GraphFailure;
    use GraphFailure as F;

    /// Each named answer keeps the status, code, subcode and type Meta documents for it.
    #[test]
    fn each_answer_has_metas_status_code_and_subcode() {
        // One row per constructor: what it builds, then HTTP status, code, subcode and type.
        #[rustfmt::skip]
        let table: [(GraphFailure, u16, i64, Option<i64>, &str); 24] = [
            (F::deprecated_version("v12.0"),               400, 2635,  None,            "OAuthException"),
            (F::bad_param("name"),                         400, 100,   None,            "OAuthException"),
            (F::nonexisting_field("x", "CustomAudience"),  400, 100,   None,            "OAuthException"),
            (F::missing_object("1"),                       400, 100,   Some(33),        "GraphMethodException"),
            (F::unsupported("get", "1"),                   400, 100,   Some(33),        "GraphMethodException"),
            (F::too_many_entries(10_001),                  400, 100,   None,            "OAuthException"),
            (F::empty_data(),                              400, 100,   None,            "OAuthException"),
            (F::invalid_schema_key("X"),                   400, 100,   None,            "OAuthException"),
            (F::lookalike_source_too_small(),              400, 2654,  Some(1_713_007), "OAuthException"),
            (F::token_missing(),                           400, 104,   None,            "OAuthException"),
            (F::token_unparseable(),                       400, 190,   None,            "OAuthException"),
            (F::token_invalid(460),                        400, 190,   Some(460),       "OAuthException"),
            (F::appsecret_proof_invalid(),                 400, 100,   None,            "GraphMethodException"),
            (F::appsecret_proof_missing(),                 400, 100,   None,            "GraphMethodException"),
            (F::client_secret_invalid(),                   400, 101,   None,            "OAuthException"),
            (F::auth_code_used(),                          400, 100,   Some(36007),     "OAuthException"),
            (F::redirect_uri_mismatch(),                   400, 100,   Some(36008),     "OAuthException"),
            (F::permission_denied("1"),                    400, 200,   None,            "OAuthException"),
            (F::ad_account_disabled("1"),                  400, 200,   Some(1_885_016), "OAuthException"),
            (F::terms_not_accepted("1"),                   400, 2655,  Some(1_870_090), "OAuthException"),
            (F::throttled_ad_account(),                    400, 80003, None,            "OAuthException"),
            (F::throttled_user(),                          400, 17,    Some(2_446_079), "OAuthException"),
            (F::unknown_error(),                           500, 1,     None,            "OAuthException"),
            (F::temporarily_unavailable(),                 400, 2,     None,            "OAuthException"),
        ];
        for (failure, http, code, subcode, kind) in table {
            assert_eq!(
                (failure.http, failure.code, failure.subcode, failure.kind),
                (http, code, subcode, kind),
                "{}",
                failure.message
            );
            assert!(!failure.html, "{}", failure.message);
        }
    }

    #[test]
    fn only_metas_transient_errors_say_so() {
        assert!(GraphFailure::unknown_error().transient);
        assert!(GraphFailure::temporarily_unavailable().transient);
        assert!(!GraphFailure::throttled_ad_account().transient);
        assert!(!GraphFailure::scripted(400, 613, Some(1_487_742), "Calls limit").transient);
        let page = GraphFailure::html_bad_gateway();
        assert_eq!((page.http, page.html), (502, true));
    }

    #[test]
    fn messages_name_what_went_wrong() {
        assert_eq!(
            GraphFailure::terms_not_accepted("3003").message,
            "(#2655) You must accept the Custom Audience terms: https://business.facebook.com/ads/manage/customaudiences/tos/?act=3003"
        );
        assert_eq!(
            GraphFailure::token_invalid(463).message,
            "Error validating access token: Session has expired."
        );
        assert_eq!(
            GraphFailure::missing_object("42").message,
            GraphFailure::unsupported("post", "42").message
        );
        let envelope = GraphFailure::token_invalid(460).envelope();
        assert_eq!(envelope["error"]["error_subcode"], 460);
        assert_eq!(envelope["error"]["code"], 190);
    }
}
