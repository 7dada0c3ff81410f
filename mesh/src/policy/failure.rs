//! How a plugin call can fail, and how a trap is told from a timeout or a memory failure.

use std::time::Duration;

use wasmtime::Store;

use super::{host::Ctx, name::SlotName};

/// How a call to a plugin failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin returned an error.
    Error,
    /// It trapped (a panic, `unreachable`, a bad memory access...).
    Trap,
    /// It ran past its deadline.
    Timeout,
    /// It wanted more memory than its cap.
    Memory,
    /// Its result broke the contract (an unknown model, an oversized string...).
    Invalid,
    /// It was not called: backing off after traps, or no instance could be made.
    Unavailable,
}

impl FailureKind {
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Error => "error",
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::Invalid => "invalid",
            FailureKind::Unavailable => "unavailable",
        }
    }

    /// Failures after which the plugin is given a rest before it is called again.
    pub fn backs_off(self) -> bool {
        matches!(
            self,
            FailureKind::Trap | FailureKind::Timeout | FailureKind::Memory
        )
    }
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.label())
    }
}

/// The result of asking a slot.
pub enum Outcome<R> {
    /// No plugin is loaded in the slot.
    Absent,
    Done(R),
    Failed(Failure),
}

pub(super) fn over_limit(limit: Duration) -> Failure {
    Failure {
        kind: FailureKind::Timeout,
        message: format!("did not finish within {limit:?} (blocked in a host call)"),
    }
}

/// Keep plugin-made strings short in logs and responses.
pub(super) fn clip(s: &str) -> String {
    const MAX: usize = 512;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

/// The error's chain without the wasm backtrace wasmtime puts in front of a trap (function
/// offsets, and source paths where the plugin has debug info): that goes to the debug log,
/// never into a response.
fn without_backtrace(e: &wasmtime::Error) -> String {
    if e.downcast_ref::<wasmtime::WasmBacktrace>().is_none() {
        return format!("{e:#}");
    }
    tracing::debug!(error = %format!("{e:#}"), "Plugin trapped");
    let rest: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
    if rest.is_empty() {
        "trapped".to_string()
    } else {
        rest.join(": ")
    }
}

pub(super) fn classify(store: &Store<Ctx>, e: wasmtime::Error, otherwise: FailureKind) -> Failure {
    let ctx = store.data();
    let (kind, message) = if ctx.call.timed_out {
        (
            FailureKind::Timeout,
            format!(
                "ran past its deadline ({:?} of CPU time, {:?} allowed)",
                ctx.call.cpu, ctx.call.budget
            ),
        )
    } else if ctx.limiter.exceeded {
        (
            FailureKind::Memory,
            "wanted more memory than its cap".to_string(),
        )
    } else {
        (otherwise, without_backtrace(&e))
    };
    Failure {
        kind,
        message: clip(&message),
    }
}

/// A request refused by a policy (a pricing denial, or a failing plugin in a closed slot).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn closed(slot: SlotName, f: &Failure) -> Self {
        Refusal {
            status: 503,
            message: format!("the {slot} policy failed: {f}"),
            retry_after: Some(1),
        }
    }
}
