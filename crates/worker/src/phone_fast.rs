//! The phone fast path: the `phonenumber` crate's parse, validity check and E.164 formatting,
//! step for step, for numbers written with digits, spaces, `-`, `.`, `(`, `)`, `/` and a leading
//! `+`. Anything else (letters, extensions, `*`, `#`, `;`, `tel:` URIs, other scripts, values
//! over 48 bytes) is not handled here: the caller asks the crate (`Fast::Defer`).
//!
//! Why it is fast: the crate keeps its compiled regexes in one LRU cache of 100 behind a global
//! mutex, looked up by pattern text on every match (and recompiled when numbers of many countries
//! evict each other), formats through its format-selection regexes even for E.164, and
//! allocates at every step. Here each region's patterns (the crate's own metadata,
//! `phonenumber::metadata::DATABASE`) are compiled once, on first use, into anchored, fully
//! determinized DFAs (`regex_automata::dfa::dense`): a match is a walk over a table, with no
//! cache and none of a regex engine's per-search setup, which on a haystack of ten digits cost
//! more than the search (the meta regex stays for the transform rule's captures, and for a
//! pattern whose DFA would be too large, with per-thread caches); the numbering-plan check
//! (`number_type(..) != Unknown`) is one multi-pattern search over the type patterns that apply
//! to the number's length; numbers live in stack buffers.
//!
//! What must never change: the result. Every step below names the crate function it mirrors
//! (phonenumber 0.3.10, `parser/mod.rs`, `parser/helper.rs`, `validator.rs`), quirks included:
//! descriptors match a *prefix* of the number (`find` with `start == 0`), the general
//! descriptor's possible lengths are empty (so a national number starting with the default
//! country's code always loses it), the national prefix is stripped twice. The differential
//! test (`phone_diff`) compares this path with the crate on generated numbers of every notation;
//! a shape this path does not reproduce exactly must be deferred, never approximated.

use crate::normalize::Invalid;
use phonenumber::country;
use phonenumber::metadata::{Descriptor, Metadata, DATABASE};
use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::util::captures::Captures;
use regex_automata::util::primitives::StateID;
use regex_automata::util::{start, syntax};
use regex_automata::{meta, Anchored, Input, MatchKind};
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Longest value (bytes, after trimming) the fast path takes; longer ones go to the crate.
const MAX_INPUT: usize = 48;
/// Room for a national number: the input's digits plus what a transform rule adds.
const BUF: usize = 64;
/// The crate's `MIN_LENGTH_FOR_NSN` and `MAX_LENGTH_FOR_NSN`.
const MIN_NSN: usize = 2;
const MAX_NSN: usize = 17;

/// What the fast path made of a value.
#[derive(Debug, PartialEq, Eq)]
pub enum Fast {
    /// The crate's answer: the E.164 digits (no `+`) were appended to the output, or the reason
    /// the value is not sent.
    Done(Result<(), Invalid>),
    /// Not a shape this path reproduces: ask the crate.
    Defer,
}

/// Appends the E.164 digits of `value` (already trimmed) to `out`, exactly as
/// `normalize::phone_with_crate` would produce them, or says why it is invalid; or defers.
/// `out` is left as it was unless the answer is `Done(Ok(()))`.
pub fn e164(value: &str, default_country: Option<country::Id>, out: &mut Vec<u8>) -> Fast {
    let table = table();
    let default = match default_country {
        Some(id) => match table.plan_for(id) {
            Some(plan) => Some(plan),
            None => return Fast::Defer,
        },
        None => None,
    };
    CACHES.with(|caches| {
        let mut caches = caches.borrow_mut();
        let mut run = Run {
            table,
            caches: &mut caches,
            chosen: None,
        };
        match run.phone(value, default) {
            Ok(number) => {
                number.write(out);
                Fast::Done(Ok(()))
            }
            Err(Stop::Invalid(reason)) => Fast::Done(Err(reason)),
            Err(Stop::Defer) => Fast::Defer,
        }
    })
}

/// Why a step stopped: the crate's verdict, or a shape left to the crate.
enum Stop {
    Invalid(Invalid),
    Defer,
}

/// What any parse error of the crate becomes.
const FORMAT: Stop = Stop::Invalid(Invalid::PhoneFormat);

type Step<T> = Result<T, Stop>;

/// A valid number: its country code and national significant number.
struct E164 {
    code: u16,
    national: Buf,
}

impl E164 {
    fn write(&self, out: &mut Vec<u8>) {
        let mut code = [0u8; 5];
        let mut i = code.len();
        let mut c = self.code;
        loop {
            i -= 1;
            code[i] = b'0' + (c % 10) as u8;
            c /= 10;
            if c == 0 {
                break;
            }
        }
        out.extend_from_slice(&code[i..]);
        out.extend_from_slice(self.national.bytes());
    }
}

/// A short byte string on the stack (digits, mostly).
#[derive(Clone, Copy)]
struct Buf {
    len: usize,
    bytes: [u8; BUF],
}

impl Buf {
    fn new() -> Buf {
        Buf {
            len: 0,
            bytes: [0; BUF],
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn push(&mut self, b: u8) -> Step<()> {
        if self.len == BUF {
            return Err(Stop::Defer);
        }
        self.bytes[self.len] = b;
        self.len += 1;
        Ok(())
    }

    fn extend(&mut self, bytes: &[u8]) -> Step<()> {
        for &b in bytes {
            self.push(b)?;
        }
        Ok(())
    }

    /// Only the ASCII digits of `bytes`: the crate's `helper::normalize` on our alphabet (digits
    /// kept, punctuation dropped; no letters or other scripts reach this path).
    fn digits_of(bytes: &[u8]) -> Step<Buf> {
        let mut out = Buf::new();
        for &b in bytes {
            if b.is_ascii_digit() {
                out.push(b)?;
            }
        }
        Ok(out)
    }

    fn drop_front(&mut self, n: usize) {
        self.bytes.copy_within(n..self.len, 0);
        self.len -= n;
    }

    fn starts_with(&self, prefix: &[u8]) -> bool {
        self.bytes().starts_with(prefix)
    }
}

/// Where the crate says the country code came from (`country::Source`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Plus,
    Idd,
    Number,
    Default,
}

/// The crate's `helper::Number` after `country_code`.
struct Number {
    national: Buf,
    /// The country code's digits, from an RFC 3966 `+<code>` prefix.
    prefix: Option<Buf>,
    source: Source,
}

/// Bytes of the fast path's alphabet after the first: digits and the punctuation the crate
/// drops.
fn allowed(b: u8) -> bool {
    b.is_ascii_digit() || matches!(b, b' ' | b'-' | b'.' | b'(' | b')' | b'/')
}

/// Whether `str::trim` would shorten `value`: only its first and last characters can say, and
/// when those are ASCII their bytes do (the caller has trimmed, so this is nearly always false).
fn untrimmed(value: &str) -> bool {
    match (value.as_bytes().first(), value.as_bytes().last()) {
        (Some(&first), Some(&last)) if first.is_ascii() && last.is_ascii() => {
            char::from(first).is_whitespace() || char::from(last).is_whitespace()
        }
        _ => value.trim().len() != value.len(),
    }
}

/// The RFC 3966 parser's separators (`rfc3966::separator`).
fn rfc_separator(b: u8) -> bool {
    matches!(b, b'-' | b'.' | b'(' | b')')
}

/// The region (plan) `source_for` names, if any, and whether it was chosen because the number
/// is one of its types.
type Chosen = Option<(usize, bool)>;

/// One value's run: the tables and this thread's search caches.
struct Run<'t, 'c> {
    table: &'t Table,
    caches: &'c mut Caches,
    /// The last region `source_for` chose among several, and for which number: `is_valid` asks
    /// again about the number `parse` asked about whenever no national prefix was stripped, and
    /// under a shared code (+1, +7, +44, ...) each answer costs two matches per region tried.
    chosen: Option<(u16, Buf, Chosen)>,
}

impl Run<'_, '_> {
    /// `normalize::phone_with_crate`.
    fn phone(&mut self, value: &str, default: Option<usize>) -> Step<E164> {
        let bytes = value.as_bytes();
        // `normalize_into` trims; the reference parses the value as given in one branch and
        // trimmed in another, so untrimmed values are left to it.
        if bytes.is_empty() || bytes.len() > MAX_INPUT || untrimmed(value) {
            return Err(Stop::Defer);
        }
        // Checked first so that no other byte reaches a matcher (they are built without Unicode,
        // `Dfa::build`); whatever the IDD matcher would have said of such a value, the answer
        // below is to defer it.
        let plain =
            bytes[1..].iter().all(|&b| allowed(b)) && (bytes[0] == b'+' || allowed(bytes[0]));
        // `international_form`, on the value as written.
        let mut s = Buf::new();
        let country = if bytes[0] == b'+' {
            s.extend(bytes)?;
            None
        } else if let Some(rest) = bytes.strip_prefix(b"00") {
            s.push(b'+')?;
            s.extend(rest)?;
            None
        } else if let Some(end) = match default.filter(|_| plain) {
            Some(plan) => match &self.table.plans[plan].compiled()?.idd {
                Some(idd) => idd.end_at_start(self.caches, bytes),
                None => None,
            },
            None => None,
        }
        .filter(|&end| end > 0)
        {
            s.push(b'+')?;
            s.extend(&bytes[end..])?;
            None
        } else if default.is_some() {
            s.extend(bytes)?;
            default
        } else {
            let digit = value.chars().any(|c| c.is_ascii_digit());
            return Err(Stop::Invalid(
                if digit && !value.chars().any(char::is_alphabetic) {
                    Invalid::PhoneNoCountry
                } else {
                    Invalid::PhoneFormat
                },
            ));
        };
        if !plain {
            return Err(Stop::Defer);
        }
        let number = self.parse(s.bytes(), country)?;
        if !self.is_valid(number.code, &number.national)? {
            return Err(Stop::Invalid(Invalid::PhoneInvalid));
        }
        Ok(number)
    }

    /// `parser::parse_with`, on a string of the fast path's alphabet (a `+` only first).
    fn parse(&mut self, s: &[u8], country: Option<usize>) -> Step<E164> {
        // `alt((rfc3966::phone_number, natural::phone_number))`.
        let (raw, raw_prefix) = match rfc3966(s) {
            Some(found) => found,
            None => (natural(s).ok_or(FORMAT)?, None),
        };
        if !viable(raw) {
            return Err(FORMAT);
        }
        let mut number = self.international_prefix(country, raw, raw_prefix)?;
        let code = self.country_code(country, &mut number)?;

        // The metadata that decides the national prefix: the default country's, or the one the
        // number's own digits point to.
        let meta = match country {
            Some(plan) => Some(plan),
            None => {
                let national = number.national.bytes();
                let zeros = national.iter().take_while(|&&b| b == b'0').count();
                self.source_for(code, &national[zeros..])?
                    .map(|(plan, _)| plan)
            }
        };
        if let Some(plan) = meta {
            let mut potential = self.national_number(plan, number.national)?;
            let p = &self.table.plans[plan];
            if let Some(prefix) = p.meta.national_prefix() {
                if potential.starts_with(prefix.as_bytes()) {
                    potential.drop_front(prefix.len());
                }
            }
            if p.length(potential.len) != Validation::TooShort {
                number.national = potential;
            }
        }
        let national = number.national;
        if national.len < MIN_NSN || national.len > MAX_NSN {
            return Err(FORMAT);
        }
        // `NationalNumber::from_str`: leading zeros counted, the rest a u64 under 2^56.
        let zeros = national.bytes().iter().take_while(|&&b| b == b'0').count();
        let rest = &national.bytes()[zeros..];
        if rest.is_empty() {
            return Err(FORMAT);
        }
        let value = rest.iter().fold(0u64, |v, &d| v * 10 + u64::from(d - b'0'));
        if value >= 1 << 56 {
            return Err(FORMAT);
        }
        Ok(E164 { code, national })
    }

    /// `helper::international_prefix` (with `helper::normalize`).
    fn international_prefix(
        &mut self,
        country: Option<usize>,
        raw: &[u8],
        raw_prefix: Option<&[u8]>,
    ) -> Step<Number> {
        if let Some(prefix) = raw_prefix {
            return Ok(Number {
                national: Buf::digits_of(raw)?,
                prefix: Some(Buf::digits_of(prefix)?),
                source: Source::Plus,
            });
        }
        let idd = match country {
            Some(plan) => self.table.plans[plan].compiled()?.idd.as_ref(),
            None => None,
        };
        let pluses = raw.iter().take_while(|&&b| b == b'+').count();
        let mut number = Number {
            national: Buf::digits_of(&raw[pluses..])?,
            prefix: None,
            source: if pluses > 0 {
                Source::Plus
            } else {
                Source::Default
            },
        };
        if let Some(idd) = idd {
            if let Some(end) = idd.end_at_start(self.caches, number.national.bytes()) {
                if !number.national.bytes()[end..].starts_with(b"0") {
                    if number.source != Source::Plus {
                        number.source = Source::Idd;
                    }
                    number.national.drop_front(end);
                }
            }
        }
        Ok(number)
    }

    /// `helper::country_code`: the country calling code, stripped from the national number
    /// where the number carries it.
    fn country_code(&mut self, country: Option<usize>, number: &mut Number) -> Step<u16> {
        match number.source {
            Source::Plus | Source::Idd | Source::Number => {
                if number.national.len <= MIN_NSN {
                    return Err(FORMAT);
                }
                if let Some(prefix) = &number.prefix {
                    let code = std::str::from_utf8(prefix.bytes())
                        .ok()
                        .and_then(|p| p.parse::<u16>().ok())
                        .ok_or(FORMAT)?;
                    return match self.table.code(code) {
                        Some(_) => Ok(code),
                        None => Err(FORMAT),
                    };
                }
                if number.national.starts_with(b"0") {
                    return Err(FORMAT);
                }
                let mut code = 0u16;
                for len in 1..=3 {
                    code = code * 10 + u16::from(number.national.bytes()[len - 1] - b'0');
                    if self.table.code(code).is_some() {
                        number.national.drop_front(len);
                        return Ok(code);
                    }
                }
                Err(FORMAT)
            }
            Source::Default => {
                let plan = country.ok_or(FORMAT)?;
                let p = &self.table.plans[plan];
                let code = p.meta.country_code();
                if number.national.starts_with(p.code_digits.as_bytes())
                    && (!self.general_is_match(plan, number.national.bytes())?
                        || !p.length(number.national.len).is_possible())
                {
                    number.source = Source::Number;
                    number.national.drop_front(p.code_digits.len());
                }
                Ok(code)
            }
        }
    }

    /// `helper::national_number`: the national prefix (and carrier code) stripped, or the
    /// transform rule applied, as the region's `national_prefix_for_parsing` says.
    fn national_number(&mut self, plan: usize, national: Buf) -> Step<Buf> {
        let p = &self.table.plans[plan];
        let compiled = p.compiled()?;
        let Some(parsing) = &compiled.npfp else {
            let mut national = national;
            if let Some(prefix) = p.meta.national_prefix() {
                if national.starts_with(prefix.as_bytes()) {
                    national.drop_front(prefix.len());
                }
            }
            return Ok(national);
        };
        let Some(end) = parsing.end_at_start(self.caches, national.bytes()) else {
            return Ok(national);
        };
        let transform = p.meta.national_prefix_transform_rule();
        let stripped = |national: Buf| {
            let mut national = national;
            national.drop_front(end);
            national
        };
        let Some(transform) = transform else {
            return Ok(stripped(national));
        };
        let text = std::str::from_utf8(national.bytes()).map_err(|_| Stop::Defer)?;
        let mut caps = parsing.re.create_captures();
        parsing.re.search_captures_with(
            self.caches.get(parsing),
            &Input::new(text).anchored(Anchored::Yes),
            &mut caps,
        );
        let last = caps.group_len().saturating_sub(1);
        if caps.get_group(last).is_none() {
            return Ok(stripped(national));
        }
        let viable = self.general_is_match(plan, national.bytes())?;
        let transformed = replace_first(&caps, text, transform);
        if viable && !self.general_is_match(plan, transformed.as_bytes())? {
            return Ok(national);
        }
        let mut out = Buf::new();
        out.extend(transformed.as_bytes())?;
        Ok(out)
    }

    /// `validator::is_valid_with`: the region the number belongs to, and whether the number is
    /// one of that region's types.
    fn is_valid(&mut self, code: u16, national: &Buf) -> Step<bool> {
        match self.source_for(code, national.bytes())? {
            None => Ok(false),
            Some((_, true)) => Ok(true),
            Some((plan, false)) => self.typed(plan, national.bytes()),
        }
    }

    /// `validator::source_for`, resolved to the metadata it names; with whether the region was
    /// chosen because the number is one of its types (then `typed` is known to be true).
    fn source_for(&mut self, code: u16, national: &[u8]) -> Step<Chosen> {
        let table = self.table;
        let Some(entry) = table.code(code) else {
            return Ok(None);
        };
        match &entry.regions {
            Regions::NonGeographic => Ok(Some((entry.first, false))),
            Regions::Single(plan) => Ok(plan.map(|p| (p, false))),
            Regions::Unsupported => Err(Stop::Defer),
            Regions::Many(plans) => {
                if let Some((c, n, chosen)) = &self.chosen {
                    if *c == code && n.bytes() == national {
                        return Ok(*chosen);
                    }
                }
                let chosen = self.choose(plans, national)?;
                let mut key = Buf::new();
                key.extend(national)?;
                self.chosen = Some((code, key, chosen));
                Ok(chosen)
            }
        }
    }

    /// `source_for` among several regions, main country first: the first whose leading digits
    /// match, or, for a region without them, of whose types the number is one.
    fn choose(&mut self, plans: &[usize], national: &[u8]) -> Step<Chosen> {
        let table = self.table;
        for &plan in plans {
            match &table.plans[plan].compiled()?.leading {
                Some(leading) => {
                    if leading.matches_at_start(self.caches, national) {
                        return Ok(Some((plan, false)));
                    }
                }
                None => {
                    if self.typed(plan, national)? {
                        return Ok(Some((plan, true)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// `validator::number_type(meta, national) != Type::Unknown`: the general pattern and at
    /// least one type's (premium rate, toll free, shared cost, VoIP, personal, pager, UAN,
    /// voicemail, fixed line, mobile), each with its possible lengths.
    fn typed(&mut self, plan: usize, national: &[u8]) -> Step<bool> {
        if !self.general_is_match(plan, national)? {
            return Ok(false);
        }
        match self.table.plans[plan].types_for_length(national.len())? {
            Some(types) => Ok(types.matches_at_start(self.caches, national)),
            None => Ok(false),
        }
    }

    /// `Descriptor::is_match` of the general descriptor.
    fn general_is_match(&mut self, plan: usize, national: &[u8]) -> Step<bool> {
        let p = &self.table.plans[plan];
        let lengths = p.meta.descriptors().general().possible_length();
        if !lengths.is_empty() && !lengths.contains(&(national.len() as u16)) {
            return Ok(false);
        }
        Ok(p.compiled()?
            .general
            .matches_at_start(self.caches, national))
    }
}

/// `Regex::replace` (the first match, here at the start) with `$n` references expanded.
fn replace_first(caps: &Captures, text: &str, replacement: &str) -> String {
    let (start, end) = caps.get_match().map_or((0, 0), |m| (m.start(), m.end()));
    let mut out = String::with_capacity(text.len() + replacement.len());
    out.push_str(&text[..start]);
    caps.interpolate_string_into(text, replacement, &mut out);
    out.push_str(&text[end..]);
    out
}

/// `rfc3966::phone_number`, tried first: on our alphabet it takes a value without spaces made of
/// digits and `-.()`, optionally after `+<code>` (the code running to the first separator).
/// Returns the national part and the code's text.
fn rfc3966(s: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    if s.contains(&b' ') {
        return None;
    }
    let (national, prefix) = match s.strip_prefix(b"+") {
        Some(rest) => {
            let k = rest
                .iter()
                .position(|&b| rfc_separator(b))
                .unwrap_or(rest.len());
            if k == 0 {
                // `take_till1` fails, `opt` rewinds, and the national part cannot start with `+`.
                return None;
            }
            (&rest[k..], Some(&rest[..k]))
        }
        None => (s, None),
    };
    let taken = national
        .iter()
        .take_while(|&&b| b.is_ascii_digit() || rfc_separator(b))
        .count();
    // `take_while1`, then `check`: nothing may follow (no `;` parameters in our alphabet).
    (taken > 0 && taken == national.len()).then_some((national, prefix))
}

/// `natural::phone_number` (`helper::extract`, then no extension in our alphabet): from the
/// first `+` or digit, without the trailing punctuation.
fn natural(s: &[u8]) -> Option<&[u8]> {
    let start = s.iter().position(|&b| b == b'+' || b.is_ascii_digit())?;
    let mut end = s.len();
    while end > start && !s[end - 1].is_ascii_digit() {
        end -= 1;
    }
    (end > start).then(|| &s[start..end])
}

/// `validator::is_viable` (`valid::phone_number`): two digits alone, or `+`s then at least three
/// digits among punctuation.
fn viable(s: &[u8]) -> bool {
    if s.len() < MIN_NSN {
        return false;
    }
    if s.len() == 2 && s.iter().all(u8::is_ascii_digit) {
        return true;
    }
    let pluses = s.iter().take_while(|&&b| b == b'+').count();
    let rest = &s[pluses..];
    !rest.contains(&b'+') && rest.iter().filter(|b| b.is_ascii_digit()).count() >= 3
}

/// `validator::Validation`, the part `length` returns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Validation {
    IsPossible,
    IsPossibleLocalOnly,
    TooShort,
    InvalidLength,
    TooLong,
}

impl Validation {
    fn is_possible(self) -> bool {
        matches!(
            self,
            Validation::IsPossible | Validation::IsPossibleLocalOnly
        )
    }
}

/// One compiled pattern, with its slot in every thread's caches.
struct Pattern {
    re: meta::Regex,
    slot: usize,
    /// The same pattern fully determinized, when that fits in `DFA_LIMIT`: a search is then a
    /// table walk over the haystack, with no cache and none of the meta engine's per-call work
    /// (which is most of the cost on haystacks of a few digits).
    dfa: Option<Dfa>,
}

/// Bytes a pattern's DFA (and its determinization) may take; past it the meta regex serves.
const DFA_LIMIT: usize = 4 << 20;

struct Dfa {
    dfa: dense::DFA<Vec<u32>>,
    start: StateID,
}

impl Dfa {
    /// Built without Unicode: `\d` is `[0-9]`, and a class matches bytes, not code points. On
    /// ASCII haystacks this answers as the crate's Unicode regex does, and every haystack is
    /// ASCII: national numbers are digits (`Buf::digits_of`), a transform rule's output is
    /// digits and the metadata's ASCII, and `Run::phone` runs the IDD matcher on the value as
    /// written only once the value is known to be of the fast path's alphabet.
    fn build(patterns: &[&str]) -> Option<Dfa> {
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .start_kind(StartKind::Anchored)
                    .match_kind(MatchKind::LeftmostFirst)
                    .accelerate(false)
                    .dfa_size_limit(Some(DFA_LIMIT))
                    .determinize_size_limit(Some(DFA_LIMIT)),
            )
            .syntax(
                syntax::Config::new()
                    .unicode(false)
                    .utf8(false)
                    .ignore_whitespace(true),
            )
            .build_many(patterns)
            .ok()?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::Yes))
            .ok()?;
        Some(Dfa { dfa, start })
    }

    /// The end of the leftmost-first match that starts at 0, as `find_fwd` finds it: a match
    /// state reached after the byte at `at` means a match ends at `at`; the dead state means
    /// no longer one can follow. `Err` at a quit byte (none without Unicode word boundaries;
    /// the meta regex answers then). With `earliest`, the first match found.
    fn end(&self, hay: &[u8], earliest: bool) -> Result<Option<usize>, ()> {
        debug_assert!(hay.is_ascii(), "{hay:?}");
        let dfa = &self.dfa;
        let mut sid = self.start;
        let mut end = None;
        for (at, &b) in hay.iter().enumerate() {
            sid = dfa.next_state(sid, b);
            if dfa.is_special_state(sid) {
                if dfa.is_match_state(sid) {
                    end = Some(at);
                    if earliest {
                        return Ok(end);
                    }
                } else if dfa.is_dead_state(sid) {
                    return Ok(end);
                } else if dfa.is_quit_state(sid) {
                    return Err(());
                }
            }
        }
        sid = dfa.next_eoi_state(sid);
        if dfa.is_match_state(sid) {
            end = Some(hay.len());
        }
        Ok(end)
    }
}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

impl Pattern {
    /// Compiles as `regex_cache` does for the crate (`RegexBuilder` with `ignore_whitespace`,
    /// the `regex` crate's defaults); several patterns match where any of them does.
    fn compile(patterns: &[&str]) -> Option<Pattern> {
        let re = meta::Builder::new()
            .configure(
                meta::Config::new()
                    .nfa_size_limit(Some(10 * (1 << 20)))
                    .hybrid_cache_capacity(2 * (1 << 20))
                    .match_kind(MatchKind::LeftmostFirst)
                    .utf8_empty(true),
            )
            .syntax(syntax::Config::new().utf8(true).ignore_whitespace(true))
            .build_many(patterns)
            .ok()?;
        Some(Pattern {
            re,
            slot: NEXT_SLOT.fetch_add(1, Ordering::Relaxed),
            dfa: Dfa::build(patterns),
        })
    }

    /// The crate's `regex.find(text).map(|m| m.start() == 0)`: a match that starts at 0 exists.
    fn matches_at_start(&self, caches: &mut Caches, hay: &[u8]) -> bool {
        if let Some(Ok(end)) = self.dfa.as_ref().map(|d| d.end(hay, true)) {
            return end.is_some();
        }
        self.re
            .is_match_with(caches.get(self), &Input::new(hay).anchored(Anchored::Yes))
    }

    /// The end of the crate's `regex.find(text)` when that match starts at 0. The leftmost
    /// match starts at 0 exactly when an anchored one exists, and then it is that one.
    fn end_at_start(&self, caches: &mut Caches, hay: &[u8]) -> Option<usize> {
        if let Some(Ok(end)) = self.dfa.as_ref().map(|d| d.end(hay, false)) {
            return end;
        }
        self.re
            .search_with(caches.get(self), &Input::new(hay).anchored(Anchored::Yes))
            .map(|m| m.end())
    }
}

/// This thread's search caches, one per pattern it has used: no pool, no lock.
#[derive(Default)]
struct Caches(Vec<Option<meta::Cache>>);

impl Caches {
    fn get(&mut self, pattern: &Pattern) -> &mut meta::Cache {
        if self.0.len() <= pattern.slot {
            self.0.resize_with(pattern.slot + 1, || None);
        }
        self.0[pattern.slot].get_or_insert_with(|| pattern.re.create_cache())
    }
}

thread_local! {
    static CACHES: RefCell<Caches> = RefCell::new(Caches::default());
}

/// One metadata entry (a region, or a non-geographic code) and its compiled patterns.
struct Plan {
    meta: &'static Metadata,
    code_digits: String,
    /// The type descriptors `number_type` tries, as (possible lengths, pattern).
    types: Vec<(&'static [u16], &'static str)>,
    compiled: OnceLock<Option<Compiled>>,
    /// Per national-number length: the type patterns that apply at that length, as one
    /// multi-pattern matcher (`None` inside: no type applies).
    by_length: Vec<OnceLock<Option<Arc<Pattern>>>>,
    /// The matchers built so far, by the set of types they cover: lengths share them.
    by_mask: Mutex<Vec<(u32, Arc<Pattern>)>>,
}

struct Compiled {
    general: Pattern,
    idd: Option<Pattern>,
    npfp: Option<Pattern>,
    leading: Option<Pattern>,
}

/// The type descriptors a region has, in the order of `validator::number_type` (only whether
/// one matches counts).
fn type_descriptors(meta: &Metadata) -> [Option<&Descriptor>; 10] {
    let d = meta.descriptors();
    [
        d.premium_rate(),
        d.toll_free(),
        d.shared_cost(),
        d.voip(),
        d.personal_number(),
        d.pager(),
        d.uan(),
        d.voicemail(),
        d.fixed_line(),
        d.mobile(),
    ]
}

impl Plan {
    fn new(meta: &'static Metadata) -> Plan {
        let types = type_descriptors(meta)
            .into_iter()
            .flatten()
            .map(|d| (d.possible_length(), d.national_number().as_str()))
            .collect();
        Plan {
            meta,
            code_digits: meta.country_code().to_string(),
            types,
            compiled: OnceLock::new(),
            by_length: (0..=BUF).map(|_| OnceLock::new()).collect(),
            by_mask: Mutex::new(Vec::new()),
        }
    }

    /// The region's patterns, compiled on first use; a pattern this engine refuses leaves the
    /// region to the crate.
    fn compiled(&self) -> Step<&Compiled> {
        self.compiled
            .get_or_init(|| {
                let one = |p: Option<&str>| match p {
                    None => Some(None),
                    Some(p) => Pattern::compile(&[p]).map(Some),
                };
                let m = self.meta;
                Some(Compiled {
                    general: Pattern::compile(&[m
                        .descriptors()
                        .general()
                        .national_number()
                        .as_str()])?,
                    idd: one(m.international_prefix().map(|r| r.as_str()))?,
                    npfp: one(m.national_prefix_for_parsing().map(|r| r.as_str()))?,
                    leading: one(m.leading_digits().map(|r| r.as_str()))?,
                })
            })
            .as_ref()
            .ok_or(Stop::Defer)
    }

    /// The matcher of the type patterns whose possible lengths allow `len` (or that state
    /// none); `None` when no type applies.
    fn types_for_length(&self, len: usize) -> Step<Option<&Pattern>> {
        let slot = self.by_length.get(len).ok_or(Stop::Defer)?;
        let found = slot.get_or_init(|| {
            let mask = self
                .types
                .iter()
                .enumerate()
                .filter(|(_, (lengths, _))| lengths.is_empty() || lengths.contains(&(len as u16)))
                .fold(0u32, |mask, (i, _)| mask | 1 << i);
            if mask == 0 {
                return None;
            }
            let mut built = self.by_mask.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, pattern)) = built.iter().find(|(m, _)| *m == mask) {
                return Some(pattern.clone());
            }
            let patterns: Vec<&str> = self
                .types
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, (_, p))| *p)
                .collect();
            let pattern = Arc::new(Pattern::compile(&patterns)?);
            built.push((mask, pattern.clone()));
            Some(pattern)
        });
        match found {
            Some(pattern) => Ok(Some(pattern)),
            // Either no type applies, or the patterns did not compile: tell the two apart.
            None if self
                .types
                .iter()
                .any(|(lengths, _)| lengths.is_empty() || lengths.contains(&(len as u16))) =>
            {
                Err(Stop::Defer)
            }
            None => Ok(None),
        }
    }

    /// `validator::length(meta, number, Type::Unknown)`: the general descriptor's lengths.
    fn length(&self, len: usize) -> Validation {
        let general = self.meta.descriptors().general();
        let possible = general.possible_length();
        let local = general.possible_local_length();
        let len = len as u16;
        let (Some(&min), Some(&max)) = (possible.first(), possible.last()) else {
            return Validation::InvalidLength;
        };
        if local.contains(&len) {
            Validation::IsPossibleLocalOnly
        } else if len == min {
            Validation::IsPossible
        } else if len < min {
            Validation::TooShort
        } else if len > max {
            Validation::TooLong
        } else if possible.contains(&len) {
            Validation::IsPossible
        } else {
            Validation::InvalidLength
        }
    }
}

/// The regions a country code names (`Database::region`), resolved to plans.
enum Regions {
    /// `"001"`: the code's first metadata (`by_code(code)[0]`).
    NonGeographic,
    /// One region: its metadata, or none when the crate cannot name the region.
    Single(Option<usize>),
    /// Several, main country first.
    Many(Vec<usize>),
    /// A layout this path does not reproduce (a region id the crate would panic on).
    Unsupported,
}

struct CodeEntry {
    /// `by_code(code)[0]`.
    first: usize,
    regions: Regions,
}

struct Table {
    plans: Vec<Plan>,
    codes: Vec<Option<CodeEntry>>,
    /// Region ids (two capital letters) to plans, indexed by the letters.
    by_letters: Vec<Option<usize>>,
}

impl Table {
    fn build() -> Table {
        let mut plans: Vec<Plan> = Vec::new();
        let index_of = |meta: &'static Metadata, plans: &mut Vec<Plan>| -> usize {
            match plans.iter().position(|p| std::ptr::eq(p.meta, meta)) {
                Some(i) => i,
                None => {
                    plans.push(Plan::new(meta));
                    plans.len() - 1
                }
            }
        };
        let database: &'static phonenumber::metadata::Database = &DATABASE;
        let mut codes: Vec<Option<CodeEntry>> = (0..1000).map(|_| None).collect();
        for code in 0..1000u16 {
            let Some(metas) = database.by_code(&code) else {
                continue;
            };
            let Some(&first) = metas.first() else {
                continue;
            };
            let first = index_of(first, &mut plans);
            for &m in &metas {
                index_of(m, &mut plans);
            }
            let by_id =
                |id: &str, plans: &mut Vec<Plan>| database.by_id(id).map(|m| index_of(m, plans));
            let regions = match database.region(&code).as_deref() {
                None | Some([]) => Regions::Unsupported,
                Some(["001"]) => Regions::NonGeographic,
                Some([id]) => Regions::Single(match id.parse::<country::Id>() {
                    Ok(_) => by_id(id, &mut plans),
                    Err(_) => None,
                }),
                Some(ids) => {
                    let resolved: Option<Vec<usize>> = ids
                        .iter()
                        .map(|id| {
                            id.parse::<country::Id>().ok()?;
                            by_id(id, &mut plans)
                        })
                        .collect();
                    resolved.map_or(Regions::Unsupported, Regions::Many)
                }
            };
            codes[usize::from(code)] = Some(CodeEntry { first, regions });
        }
        let mut by_letters = vec![None; 26 * 26];
        for (i, plan) in plans.iter().enumerate() {
            if let Some(slot) = letters(plan.meta.id()) {
                if database
                    .by_id(plan.meta.id())
                    .is_some_and(|m| std::ptr::eq(m, plan.meta))
                {
                    by_letters[slot] = Some(i);
                }
            }
        }
        Table {
            plans,
            codes,
            by_letters,
        }
    }

    fn code(&self, code: u16) -> Option<&CodeEntry> {
        self.codes.get(usize::from(code))?.as_ref()
    }

    /// `database.by_id(country)`.
    fn plan_for(&self, id: country::Id) -> Option<usize> {
        self.by_letters[letters(id.as_ref())?]
    }
}

fn letters(id: &str) -> Option<usize> {
    match id.as_bytes() {
        &[a @ b'A'..=b'Z', b @ b'A'..=b'Z'] => {
            Some(usize::from(a - b'A') * 26 + usize::from(b - b'A'))
        }
        _ => None,
    }
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(Table::build)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn rfc3966_takes_values_without_spaces_and_splits_a_plus_code() {
        assert_eq!(
            rfc3966(b"+1-212-736-5000"),
            Some((&b"-212-736-5000"[..], Some(&b"1"[..])))
        );
        assert_eq!(rfc3966(b"212.736.5000"), Some((&b"212.736.5000"[..], None)));
        assert_eq!(
            rfc3966(b"+12127365000"),
            None,
            "no national part after the code"
        );
        assert_eq!(rfc3966(b"+-1"), None);
        assert_eq!(rfc3966(b"212 736 5000"), None, "spaces are not RFC 3966");
        assert_eq!(rfc3966(b"301/23456"), None, "`/` is not a separator there");
    }

    #[test]
    fn natural_starts_at_the_first_digit_or_plus_and_drops_trailing_punctuation() {
        assert_eq!(natural(b"(212) 736-5000"), Some(&b"212) 736-5000"[..]));
        assert_eq!(natural(b"212-736-5000.)"), Some(&b"212-736-5000"[..]));
        assert_eq!(natural(b"+"), None);
        assert_eq!(natural(b"(-)"), None);
    }

    #[test]
    fn viability_is_two_digits_or_three_after_pluses() {
        assert!(viable(b"00"));
        assert!(viable(b"1-2-3"));
        assert!(viable(b"++123"));
        assert!(!viable(b"1"));
        assert!(!viable(b"1-2"));
        assert!(!viable(b"12+3"));
    }

    #[test]
    fn every_region_of_the_database_has_a_plan_and_compiles() {
        let table = table();
        assert!(table.plans.len() > 240, "{}", table.plans.len());
        for plan in &table.plans {
            assert!(plan.compiled().is_ok(), "{}", plan.meta.id());
        }
        assert!(table
            .codes
            .iter()
            .flatten()
            .all(|c| !matches!(c.regions, Regions::Unsupported)));
    }

    /// Every pattern's DFA against its meta regex: on the metadata's example numbers, their
    /// prefixes and extensions, and random digits.
    #[test]
    fn every_dfa_answers_as_its_meta_regex() {
        let table = table();
        let mut caches = Caches::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut digit = move || b'0' + rng.gen_range(0..10u8);
        let (mut with_dfa, mut without, mut bytes) = (0, 0, 0);
        for plan in &table.plans {
            let examples: Vec<&str> = type_descriptors(plan.meta)
                .into_iter()
                .filter_map(|d| d.and_then(|d| d.example()))
                .collect();
            let mut hays: Vec<Vec<u8>> = Vec::new();
            for example in examples {
                let e = example.as_bytes();
                for cut in 0..=e.len() {
                    hays.push(e[..cut].to_vec());
                }
                for _ in 0..4 {
                    let mut longer = e.to_vec();
                    longer.push(digit());
                    hays.push(longer);
                }
                let prefixed = [plan.code_digits.as_bytes(), e].concat();
                hays.push(prefixed);
            }
            for len in 0..20 {
                for _ in 0..20 {
                    hays.push((0..len).map(|_| digit()).collect());
                }
            }
            // What makes a transform's output ASCII, as `Dfa::build` needs.
            assert!(plan
                .meta
                .national_prefix_transform_rule()
                .is_none_or(|t| t.is_ascii()));
            let compiled = plan.compiled().ok().unwrap();
            let mut patterns: Vec<&Pattern> = [
                Some(&compiled.general),
                compiled.idd.as_ref(),
                compiled.npfp.as_ref(),
                compiled.leading.as_ref(),
            ]
            .into_iter()
            .flatten()
            .collect();
            for len in 0..=BUF {
                if let Ok(Some(types)) = plan.types_for_length(len) {
                    patterns.push(types);
                }
            }
            for pattern in patterns {
                let Some(dfa) = &pattern.dfa else {
                    without += 1;
                    continue;
                };
                with_dfa += 1;
                bytes += dfa.dfa.memory_usage();
                for hay in &hays {
                    let input = Input::new(hay).anchored(Anchored::Yes);
                    let cache = caches.get(pattern);
                    let end = pattern.re.search_with(cache, &input).map(|m| m.end());
                    let found = pattern.re.is_match_with(cache, &input);
                    assert_eq!(dfa.end(hay, false), Ok(end), "{} {hay:?}", plan.meta.id());
                    assert_eq!(dfa.end(hay, true).map(|e| e.is_some()), Ok(found));
                }
            }
        }
        eprintln!("{with_dfa} DFAs ({bytes} bytes), {without} patterns without");
        assert_eq!(without, 0);
    }

    #[test]
    fn untrimmed_says_what_trim_would() {
        for value in [
            "",
            " ",
            "1",
            " 1",
            "1 ",
            "\u{b}1",
            "1\u{b}",
            "\u{a0}1",
            "1\u{3000}",
            "é1",
            "1é",
            "1 2",
        ] {
            assert_eq!(untrimmed(value), value.trim() != value, "{value:?}");
        }
    }

    #[test]
    fn longer_or_other_values_are_deferred() {
        let us = Some(country::Id::US);
        let mut out = Vec::new();
        for value in [
            "212-736-5000 ext. 42",
            "212-736-5000 x42",
            "tel:+1-212-736-5000",
            "+1 212 736 5000 +1",
            "２１２７３６５０００",
            "1-800-FLOWERS",
            "212\t736 5000",
            "+1 212 736 5000 0000 0000 0000 0000 0000 0000 0000",
            " 212 736 5000",
        ] {
            assert_eq!(e164(value, us, &mut out), Fast::Defer, "{value:?}");
        }
        assert!(out.is_empty());
    }
}
