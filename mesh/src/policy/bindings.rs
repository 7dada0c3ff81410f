//! The Rust bindings of `wit/`: the host's import interfaces, generated once, and the plugin
//! worlds that reuse them.

/// Import interfaces, generated once and shared by the three worlds below.
pub mod imports {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "host",
        imports: { "flatmesh:policy/embedder.embed": async, default: trappable },
    });
}

/// Bindings of one plugin world, reusing the import interfaces it names.
macro_rules! world {
    ($module:ident, $world:literal, [$($name:literal => $interface:ident),*]) => {
        pub mod $module {
            wasmtime::component::bindgen!({
                path: "../wit",
                world: $world,
                exports: { default: async },
                with: {
                    $($name: crate::policy::bindings::imports::flatmesh::policy::$interface,)*
                },
            });
        }
    };
}

world!(router, "router", [
    "flatmesh:policy/types" => types,
    "flatmesh:policy/log" => log,
    "flatmesh:policy/clock" => clock,
    "flatmesh:policy/kv" => kv,
    "flatmesh:policy/counters" => counters,
    "flatmesh:policy/embedder" => embedder
]);
world!(cache, "cache", [
    "flatmesh:policy/types" => types,
    "flatmesh:policy/log" => log,
    "flatmesh:policy/clock" => clock,
    "flatmesh:policy/kv" => kv,
    "flatmesh:policy/counters" => counters,
    "flatmesh:policy/embedder" => embedder,
    "flatmesh:policy/answers" => answers
]);
world!(pricing, "pricing", [
    "flatmesh:policy/types" => types,
    "flatmesh:policy/log" => log,
    "flatmesh:policy/clock" => clock,
    "flatmesh:policy/kv" => kv,
    "flatmesh:policy/counters" => counters
]);

world!(residency, "residency", [
    "flatmesh:policy/log" => log,
    "flatmesh:policy/clock" => clock,
    "flatmesh:policy/kv" => kv,
    "flatmesh:policy/counters" => counters
]);

pub use imports::flatmesh::policy::{answers::Answer, types};
