//! What a running request holds: its admission, its lease and its execution slot.

use crate::{cache::Lease, scheduler::Slot, tenancy::limits::Admission};

/// What a running request holds; dropping it gives everything back.
pub struct Held {
    admission: Admission,
    _lease: Lease,
    _slot: Slot,
}

impl Held {
    pub fn new(admission: Admission, lease: Lease, slot: Slot) -> Self {
        Held {
            admission,
            _lease: lease,
            _slot: slot,
        }
    }

    /// The request failed for its own content: it costs no rate-limit count.
    pub fn refund(self) {
        self.admission.refund();
    }
}
