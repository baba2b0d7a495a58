//! Injected faults: the `Fault` a test or the control API scripts, which one the next call gets
//! (scripted first, in order; then, for add-users calls only, a random one drawn from the seeded
//! generator at the configured rates, so a run is reproducible), and the error answer of those
//! that are errors. How a hang, a reset or a slow body travels is `graph.rs`'s part; whether a
//! faulted call is applied is decided in one place there (`faulted`), never here.

use super::failure::GraphFailure;
use super::state::State;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A scripted answer for the next add-users (or, with `Emulator::inject_on_create`,
/// create-audience) call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// HTTP 500 with Meta's envelope, code 1.
    Http500,
    /// HTTP 502 with an HTML body, as proxies answer.
    HtmlBadGateway,
    /// Code 2, `is_transient: true`.
    Transient,
    /// Applied, but answered only after this long.
    Hang { ms: u64 },
    /// The connection is cut before an answer; not applied.
    Reset,
    /// Applied; the body arrives over this long.
    SlowBody { ms: u64 },
    /// Any Meta error.
    Error {
        http: u16,
        code: i64,
        subcode: Option<i64>,
        message: String,
    },
}

impl Fault {
    /// The error answer of a fault that is one; None for hangs, resets and slow bodies, which
    /// are about how an answer travels.
    pub(super) fn failure(&self) -> Option<GraphFailure> {
        Some(match self {
            Fault::Http500 => GraphFailure::unknown_error(),
            Fault::HtmlBadGateway => GraphFailure::html_bad_gateway(),
            Fault::Transient => GraphFailure::temporarily_unavailable(),
            Fault::Error {
                http,
                code,
                subcode,
                message,
            } => GraphFailure::scripted(*http, *code, *subcode, message),
            Fault::Hang { .. } | Fault::Reset | Fault::SlowBody { .. } => return None,
        })
    }
}

impl State {
    /// The next scripted or random fault for an add-users call, if any. Random faults draw from
    /// the seeded generator, so a run is reproducible.
    pub fn next_fault(&mut self) -> Option<Fault> {
        if let Some(f) = self.scripted_faults.pop_front() {
            return Some(f);
        }
        let c = &self.config;
        let table = [
            (c.error_rate_5xx, Fault::Http500),
            (c.error_rate_transient, Fault::Transient),
            (c.hang_rate, Fault::Hang { ms: c.hang_ms }),
            (c.reset_rate, Fault::Reset),
            (c.slow_rate, Fault::SlowBody { ms: c.slow_ms }),
        ];
        if table.iter().all(|(rate, _)| *rate <= 0.0) {
            return None;
        }
        let roll: f64 = self.rng.gen();
        let mut edge = 0.0;
        for (rate, fault) in table {
            edge += rate;
            if roll < edge {
                return Some(fault);
            }
        }
        None
    }

    /// The next scripted fault for a create-audience call. Creates draw no random faults: the
    /// configured rates (and the seeded sequence they draw) stay those of add-users calls.
    pub fn next_create_fault(&mut self) -> Option<Fault> {
        self.create_faults.pop_front()
    }
}
