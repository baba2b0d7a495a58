//! Names of what the fleet creates at Meta, kept within Meta's length limit.

/// The longest audience name sent to Meta, in characters. Meta's reference documents no limit;
/// 200 is this project's assumption (*unconfirmed*), and the emulator refuses longer names, so a
/// change here is a change there.
pub const MAX_AUDIENCE_NAME_CHARS: usize = 200;

/// `prefix` + `suffix`, the prefix shortened with "…" when the whole would pass Meta's limit.
pub fn bounded_name(prefix: &str, suffix: &str) -> String {
    let room = MAX_AUDIENCE_NAME_CHARS.saturating_sub(suffix.chars().count());
    let prefix = prefix.trim();
    if prefix.chars().count() <= room {
        return format!("{prefix}{suffix}");
    }
    let kept: String = prefix.chars().take(room.saturating_sub(1)).collect();
    format!("{}…{suffix}", kept.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_name_is_shortened_but_keeps_what_makes_it_unique() {
        let suffix = " - Email - 2026-12-04 (exp-1)";
        assert_eq!(bounded_name("Churned", suffix), format!("Churned{suffix}"));
        let long = "Ü".repeat(300);
        let name = bounded_name(&long, suffix);
        assert_eq!(name.chars().count(), MAX_AUDIENCE_NAME_CHARS);
        assert!(name.ends_with(&format!("…{suffix}")), "{name}");
        let exact = "a".repeat(MAX_AUDIENCE_NAME_CHARS - suffix.chars().count());
        assert_eq!(
            bounded_name(&exact, suffix).chars().count(),
            MAX_AUDIENCE_NAME_CHARS
        );
        assert!(!bounded_name(&exact, suffix).contains('…'));
    }
}
