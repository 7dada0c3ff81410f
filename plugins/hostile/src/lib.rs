//! hostile: a router plugin that misbehaves on purpose, to test that the agent contains it.
//!
//! Its config string picks the behaviour of `route`: `loop` (never returns), `bomb` (allocates
//! until memory runs out), `trap` (executes `unreachable`), `panic`, `huge` (returns a 1 MiB
//! reason), `invalid` (routes to a model that is not a candidate), `sleep` (blocks in a host
//! call for an hour), `reject` (refuses its config at init), or `route:<model>` (behaves,
//! routing every request to `<model>`).

use std::cell::RefCell;

wit_bindgen::generate!({ path: "../../wit", world: "router" });

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

struct Hostile;

impl Guest for Hostile {
    fn init(config: String) -> Result<(), String> {
        if config == "reject" {
            return Err("hostile: this config is rejected on purpose".into());
        }
        MODE.with(|m| *m.borrow_mut() = config);
        Ok(())
    }

    fn route(
        request: RequestInfo,
        _candidates: Vec<Candidate>,
    ) -> Result<Option<Decision>, String> {
        let mode = MODE.with(|m| m.borrow().clone());
        match mode.as_str() {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "bomb" => {
                // Reserve 4 MiB at a time, touching one byte of each: the host sees the growth
                // (memory.grow), not the time it takes to fill pages.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut chunk = Vec::with_capacity(4 << 20);
                    chunk.push(1u8);
                    hoard.push(std::hint::black_box(chunk));
                }
            }
            "trap" => trap(),
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(None)
            }
            "panic" => panic!("hostile plugin panics on request {}", request.id),
            "huge" => Ok(Some(Decision {
                target: request.model,
                fallbacks: Vec::new(),
                reason: "x".repeat(1 << 20),
            })),
            "invalid" => Ok(Some(Decision {
                target: "no-such-model-anywhere".into(),
                fallbacks: Vec::new(),
                reason: "routes nowhere".into(),
            })),
            other => match other.strip_prefix("route:") {
                Some(model) => Ok(Some(Decision {
                    target: model.to_string(),
                    fallbacks: Vec::new(),
                    reason: "hostile plugin behaving".into(),
                })),
                None => Err(format!("hostile: unknown mode `{other}`")),
            },
        }
    }
}

/// Executes WebAssembly's `unreachable` (a plain abort where the crate is built for tests).
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

export!(Hostile);
