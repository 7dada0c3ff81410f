//! The plugin kinds, one per WIT world: how each is linked, instantiated and
//! initialised. The rest of the host is generic over them.

use std::future::Future;

use wasmtime::{
    component::{HasSelf, InstancePre, Linker},
    Store,
};

use super::host::{self, Ctx};

/// One plugin kind: its world's bindings.
pub trait Kind: Send + Sync + 'static {
    /// The slot's name (`router`, `cache`, `pricing`), also a metric label.
    const SLOT: &'static str;
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
    ($kind:ident, $slot:literal, $module:ident, $world:ident, $pre:ident) => {
        /// The plugin kind of the
        #[doc = $slot]
        /// slot.
        pub struct $kind;

        impl Kind for $kind {
            const SLOT: &'static str = $slot;
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

kind!(RouterKind, "router", router, Router, RouterPre);
kind!(CacheKind, "cache", cache, Cache, CachePre);
kind!(PricingKind, "pricing", pricing, Pricing, PricingPre);
kind!(
    ResidencyKind,
    "residency",
    residency,
    Residency,
    ResidencyPre
);

/// An instance of a plugin, initialised with its config, ready for calls.
pub struct Instance<K: Kind> {
    pub store: Store<Ctx>,
    pub bindings: K::Bindings,
}
