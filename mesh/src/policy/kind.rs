//! The plugin kinds, one per WIT world: how each is linked, instantiated and
//! initialised. The rest of the host is generic over them.

use std::future::Future;

use wasmtime::{
    component::{HasSelf, InstancePre, Linker},
    Store,
};

use super::{
    host::{self, Ctx},
    name::SlotName,
};

/// One plugin kind: its world's bindings.
pub trait Kind: Send + Sync + 'static {
    /// The slot it goes in.
    const SLOT: SlotName;
    type Pre: Clone + Send + Sync + 'static;
    type Bindings: Send + 'static;

    fn add_to_linker(linker: &mut Linker<Ctx>) -> wasmtime::Result<()>;
    fn pre(pre: InstancePre<Ctx>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<Ctx>,
    ) -> impl Future<Output = wasmtime::Result<Self::Bindings>> + Send;
    fn init(
        bindings: &Self::Bindings,
        store: &mut Store<Ctx>,
        config: &str,
    ) -> impl Future<Output = wasmtime::Result<Result<(), String>>> + Send;
}

macro_rules! kind {
    ($kind:ident, $slot:ident, $module:ident, $world:ident, $pre:ident) => {
        #[doc = concat!("The plugin kind of the `", stringify!($module), "` slot.")]
        pub struct $kind;

        impl Kind for $kind {
            const SLOT: SlotName = SlotName::$slot;
            type Pre = host::$module::$pre<Ctx>;
            type Bindings = host::$module::$world;

            fn add_to_linker(linker: &mut Linker<Ctx>) -> wasmtime::Result<()> {
                host::$module::$world::add_to_linker::<Ctx, HasSelf<Ctx>>(linker, |c| c)
            }

            fn pre(pre: InstancePre<Ctx>) -> wasmtime::Result<Self::Pre> {
                host::$module::$pre::new(pre)
            }

            async fn instantiate(
                pre: &Self::Pre,
                store: &mut Store<Ctx>,
            ) -> wasmtime::Result<Self::Bindings> {
                pre.instantiate_async(store).await
            }

            async fn init(
                bindings: &Self::Bindings,
                store: &mut Store<Ctx>,
                config: &str,
            ) -> wasmtime::Result<Result<(), String>> {
                bindings.call_init(store, config).await
            }
        }
    };
}

kind!(RouterKind, Router, router, Router, RouterPre);
kind!(CacheKind, Cache, cache, Cache, CachePre);
kind!(PricingKind, Pricing, pricing, Pricing, PricingPre);
kind!(ResidencyKind, Residency, residency, Residency, ResidencyPre);

/// An instance of a plugin, initialised with its config, ready for calls.
pub struct Instance<K: Kind> {
    pub store: Store<Ctx>,
    pub bindings: K::Bindings,
}

/// The WIT package version this agent links plugins against, read from `wit/policy.wit`.
fn wit_version() -> &'static str {
    const WIT: &str = include_str!("../../../wit/policy.wit");
    WIT.lines()
        .find_map(|l| l.trim().strip_prefix("package flatmesh:policy@"))
        .map_or("", |v| v.trim_end_matches(';'))
}

/// Why a plugin that does not link may not fit: it was built against another version of
/// the WIT package (named by its imports and exports); empty when that is not the reason.
pub fn version_hint(
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
) -> String {
    let ty = component.component_type();
    let names: Vec<String> = ty
        .imports(engine)
        .map(|(n, _)| n.to_string())
        .chain(ty.exports(engine).map(|(n, _)| n.to_string()))
        .collect();
    hint(names.iter().map(String::as_str), wit_version())
}

fn hint<'a>(mut names: impl Iterator<Item = &'a str>, ours: &str) -> String {
    let theirs = names.find_map(|n| {
        let (_, version) = n.strip_prefix("flatmesh:policy/")?.split_once('@')?;
        (version != ours).then_some(version)
    });
    theirs.map_or_else(String::new, |v| {
        format!(" (it was built against flatmesh:policy@{v}; this agent speaks @{ours}: rebuild it against wit/policy.wit)")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_plugin_of_another_wit_version_is_told_so() {
        let ours = super::wit_version();
        assert!(ours.starts_with("0."), "{ours}");
        let old = ["wasi:io/streams@0.2.0", "flatmesh:policy/host@0.1.0"];
        let h = super::hint(old.into_iter(), ours);
        assert!(h.contains("built against flatmesh:policy@0.1.0"), "{h}");
        let current = format!("flatmesh:policy/host@{ours}");
        assert_eq!(super::hint([current.as_str()].into_iter(), ours), "");
        assert_eq!(super::hint(["wasi:cli/run@0.2.0"].into_iter(), ours), "");
    }
}
