//! Settings that list several servers in one value (`AE_AMQP_URL`, `AE_REDIS_URL`): split where
//! a new URL starts, never inside one (a comma is legal in a password), and shown in logs without
//! credentials.

/// Splits `value` before every `,<scheme>://` of `schemes`; a comma elsewhere stays in its URL.
/// Empty items (a trailing comma) are dropped; blanks around items are trimmed.
pub fn split<'a>(value: &'a str, schemes: &[&str]) -> Vec<&'a str> {
    let mut starts = vec![0];
    for (i, _) in value.match_indices(',') {
        let rest = value[i + 1..].trim_start();
        if schemes.iter().any(|s| rest.starts_with(&format!("{s}://"))) {
            starts.push(i + 1);
        }
    }
    starts.push(value.len() + 1);
    starts
        .windows(2)
        .map(|w| value[w[0]..w[1] - 1].trim())
        .map(|item| item.trim_end_matches(',').trim())
        .filter(|item| !item.is_empty())
        .collect()
}

/// `scheme://host:port` of a URL, for logs: never its user, password, path or query; nothing of
/// it when it does not parse.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}", u.scheme()),
            (Some(host), None) => format!("{}://{host}", u.scheme()),
            // No host: not a server URL (`user:password@host` without a scheme parses so).
            _ => "<unparsable URL>".into(),
        },
        Err(_) => "<unparsable URL>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_splits_only_where_a_url_starts() {
        assert_eq!(
            split(
                "amqp://u:pa,ss@a:5672/%2f, amqp://u:p@b/%2f,",
                &["amqp", "amqps"]
            ),
            vec!["amqp://u:pa,ss@a:5672/%2f", "amqp://u:p@b/%2f"]
        );
        assert_eq!(split("amqp://a/%2f", &["amqp"]), vec!["amqp://a/%2f"]);
        assert_eq!(
            split("redis://:p,w@a:1,redis://b:2", &["redis"]),
            vec!["redis://:p,w@a:1", "redis://b:2"]
        );
    }

    #[test]
    fn logs_see_the_host_only() {
        assert_eq!(redacted("amqp://u:s,cret@a:5672/%2f"), "amqp://a:5672");
        assert_eq!(redacted("amqp://u:p@[::1]:5672/"), "amqp://[::1]:5672");
        assert_eq!(redacted("u:p@nothing"), "<unparsable URL>");
    }
}
