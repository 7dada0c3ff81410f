//! What a running request holds: its admission, its lease and its execution slot.

use crate::{cache::Lease, scheduler::Slot, tenancy::limits::Admission};

/// What a running request holds; dropping it gives everything back. The admission's place
/// in the tenant's request window stays: a request that reached the engine counts against
/// the caller's rate however it ended.
pub struct Held {
    _admission: Admission,
    _lease: Lease,
    _slot: Slot,
}

impl Held {
    pub fn new(admission: Admission, lease: Lease, slot: Slot) -> Self {
        Held {
            _admission: admission,
            _lease: lease,
            _slot: slot,
        }
    }
}
