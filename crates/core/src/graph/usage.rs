//! Meta's usage headers, read from every answer: how much of an ad account's budget is used and,
//! once throttled, when it comes back. The worker pauses an account fleet-wide from these
//! figures before Meta has to refuse it.

use reqwest::header::HeaderMap;
use std::time::Duration;

/// The most loaded figure Meta reported for an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Highest percentage among `call_count`, `total_time`, `total_cputime` of every
    /// business-use-case entry, `acc_id_util_pct`, and the app's figures.
    pub percent: u64,
    /// `estimated_time_to_regain_access` (minutes in the header), when Meta gave one.
    pub regain: Option<Duration>,
    /// `X-Ad-Account-Usage.reset_time_duration` (seconds), when Meta gave one above zero: the
    /// shortest pause worth taking after a throttle.
    pub reset: Option<Duration>,
}

impl Usage {
    /// Reads `X-Business-Use-Case-Usage`, `X-Ad-Account-Usage` and `X-App-Usage`; None when
    /// none is present or parseable.
    pub fn from_headers(headers: &HeaderMap) -> Option<Usage> {
        let json = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
        };
        let pct = |v: &serde_json::Value, key: &str| v.get(key).and_then(|x| x.as_f64());
        let mut found = false;
        let mut usage = Usage::default();
        let mut take = |p: Option<f64>| {
            if let Some(p) = p {
                found = true;
                usage.percent = usage.percent.max(p.max(0.0).ceil() as u64);
            }
        };
        if let Some(buc) = json("x-business-use-case-usage") {
            for entries in buc.as_object().into_iter().flat_map(|m| m.values()) {
                for entry in entries.as_array().into_iter().flatten() {
                    for key in ["call_count", "total_time", "total_cputime"] {
                        take(pct(entry, key));
                    }
                    if let Some(minutes) = entry
                        .get("estimated_time_to_regain_access")
                        .and_then(|m| m.as_u64())
                        .filter(|m| *m > 0)
                    {
                        let d = Duration::from_secs(minutes * 60);
                        usage.regain = Some(usage.regain.map_or(d, |r| r.max(d)));
                    }
                }
            }
        }
        if let Some(account) = json("x-ad-account-usage") {
            take(pct(&account, "acc_id_util_pct"));
            usage.reset = account
                .get("reset_time_duration")
                .and_then(|s| s.as_f64())
                .filter(|s| *s > 0.0 && s.is_finite())
                .map(Duration::from_secs_f64);
        }
        if let Some(app) = json("x-app-usage") {
            for key in ["call_count", "total_time", "total_cputime"] {
                take(pct(&app, key));
            }
        }
        found.then_some(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn the_highest_figure_wins_and_regain_time_is_read() {
        let h = headers(&[
            (
                "x-business-use-case-usage",
                r#"{"1001":[{"type":"custom_audience","call_count":42,"total_cputime":7,"total_time":95,"estimated_time_to_regain_access":3}]}"#,
            ),
            (
                "x-ad-account-usage",
                r#"{"acc_id_util_pct":12.5,"reset_time_duration":60}"#,
            ),
            (
                "x-app-usage",
                r#"{"call_count":5,"total_time":1,"total_cputime":1}"#,
            ),
        ]);
        let u = Usage::from_headers(&h).expect("usage");
        assert_eq!(u.percent, 95);
        assert_eq!(u.regain, Some(Duration::from_secs(180)));
        assert_eq!(u.reset, Some(Duration::from_secs(60)));
    }

    #[test]
    fn absent_or_broken_headers_give_nothing() {
        assert_eq!(Usage::from_headers(&HeaderMap::new()), None);
        assert_eq!(
            Usage::from_headers(&headers(&[("x-app-usage", "not json")])),
            None
        );
        let only_account = headers(&[("x-ad-account-usage", r#"{"acc_id_util_pct":101}"#)]);
        assert_eq!(
            Usage::from_headers(&only_account).map(|u| u.percent),
            Some(101)
        );
    }
}
