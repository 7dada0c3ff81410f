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
