//! Page-in of one copy onto a device, above the driver: the GGUF bytes as stored, copied in
//! chunks on the copy's stream while its other allocations are made; every byte the copy
//! holds counted, and all of it handed back when any allocation fails.
//!
//! `DeviceMemory` is what the layer needs from a device; `backend.rs` implements it over
//! cudarc (UNVERIFIED on a GPU), and the unit tests here over an allocator that fails on
//! demand.

use std::ops::Range;
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

/// Bytes of one host-to-device copy: big enough that each copy's fixed cost is small, small
/// enough that the first chunks run while later ones are queued.
pub const CHUNK_BYTES: usize = 8 << 20;

/// Why a device allocation or copy failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    #[error("out of device memory allocating {bytes} bytes for {what} ({held} bytes already held by this copy)")]
    OutOfMemory {
        bytes: u64,
        what: &'static str,
        held: u64,
    },
    #[error("device error during {what}: {reason}")]
    Driver { what: &'static str, reason: String },
}

/// A failure as the driver reports it, before it is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    OutOfMemory,
    Other(String),
}

/// What the page-in needs from a device: allocations (freed when dropped), asynchronous
/// copies from host memory on one stream, and a wait for them.
pub trait DeviceMemory {
    type Block;
    fn alloc(&self, bytes: usize) -> Result<Self::Block, Failure>;
    /// Queue a copy of `src` into `dst` at `offset`.
    fn copy_in(&self, dst: &mut Self::Block, offset: usize, src: &[u8]) -> Result<(), Failure>;
    /// Wait until every queued copy is done.
    fn finish(&self) -> Result<(), Failure>;
}

/// The bytes one copy holds on its device; shared by the copy's allocations, each of which
/// takes its bytes back when dropped.
#[derive(Debug, Clone, Default)]
pub struct Held(Arc<AtomicU64>);

impl Held {
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// A device allocation counted in a copy's `Held`.
#[derive(Debug)]
pub struct Counted<B> {
    pub block: B,
    bytes: u64,
    held: Held,
}

impl<B> Counted<B> {
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        self.held.0.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Allocate `bytes` for `what`, counted in `held`; an out-of-memory failure says what and how
/// much.
pub fn alloc<M: DeviceMemory>(
    mem: &M,
    held: &Held,
    bytes: usize,
    what: &'static str,
) -> Result<Counted<M::Block>, MemError> {
    match mem.alloc(bytes.max(1)) {
        Ok(block) => {
            let bytes = bytes.max(1) as u64;
            held.0.fetch_add(bytes, Ordering::AcqRel);
            Ok(Counted {
                block,
                bytes,
                held: held.clone(),
            })
        }
        Err(f) => Err(named(f, what, bytes as u64, held)),
    }
}

fn named(f: Failure, what: &'static str, bytes: u64, held: &Held) -> MemError {
    match f {
        Failure::OutOfMemory => MemError::OutOfMemory {
            bytes,
            what,
            held: held.bytes(),
        },
        Failure::Other(reason) => MemError::Driver { what, reason },
    }
}

/// The chunks of a copy of `len` bytes, in order.
pub fn chunks(len: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk.max(1);
    (0..len.div_ceil(chunk)).map(move |i| i * chunk..((i + 1) * chunk).min(len))
}

/// A page-in under way: the weights' allocation with its chunk copies queued; other
/// allocations are made while they run, then `finish` waits for them.
pub struct PageIn<'m, M: DeviceMemory> {
    mem: &'m M,
    pub held: Held,
    pub weights: Counted<M::Block>,
}

impl<'m, M: DeviceMemory> PageIn<'m, M> {
    /// Allocate room for `image` and queue its copy in chunks of `chunk` bytes.
    pub fn start(mem: &'m M, image: &[u8], chunk: usize) -> Result<Self, MemError> {
        let held = Held::default();
        let mut weights = alloc(mem, &held, image.len(), "the weights")?;
        for r in chunks(image.len(), chunk) {
            let at = r.start;
            mem.copy_in(&mut weights.block, at, &image[r])
                .map_err(|f| named(f, "the weights' copy", image.len() as u64, &held))?;
        }
        Ok(PageIn { mem, held, weights })
    }

    /// Another allocation of the same copy, made while the weights' copies run.
    pub fn alloc(&self, bytes: usize, what: &'static str) -> Result<Counted<M::Block>, MemError> {
        alloc(self.mem, &self.held, bytes, what)
    }

    /// Wait for the weights' copies; the weights' allocation and the copy's count.
    pub fn finish(self) -> Result<(Counted<M::Block>, Held), MemError> {
        let what = "the weights' copy";
        let bytes = self.weights.len();
        self.mem
            .finish()
            .map_err(|f| named(f, what, bytes, &self.held))?;
        Ok((self.weights, self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{cell::RefCell, rc::Rc};

    /// A device of `capacity` bytes that records what it is asked to do, and fails the
    /// allocation numbered `fail_at` (0-based) if set.
    #[derive(Default)]
    struct Fake {
        capacity: u64,
        used: Rc<RefCell<u64>>,
        log: RefCell<Vec<String>>,
        allocs: RefCell<usize>,
        fail_at: Option<usize>,
        data: RefCell<Vec<Vec<u8>>>,
    }

    #[derive(Debug)]
    struct Block {
        id: usize,
        len: u64,
        used: Rc<RefCell<u64>>,
    }

    impl Drop for Block {
        fn drop(&mut self) {
            *self.used.borrow_mut() -= self.len;
        }
    }

    impl DeviceMemory for Fake {
        type Block = Block;
        fn alloc(&self, bytes: usize) -> Result<Block, Failure> {
            let n = *self.allocs.borrow();
            *self.allocs.borrow_mut() += 1;
            let full = *self.used.borrow() + bytes as u64 > self.capacity;
            if full || self.fail_at == Some(n) {
                self.log.borrow_mut().push(format!("oom {bytes}"));
                return Err(Failure::OutOfMemory);
            }
            *self.used.borrow_mut() += bytes as u64;
            self.log.borrow_mut().push(format!("alloc {bytes}"));
            self.data.borrow_mut().push(vec![0; bytes]);
            Ok(Block {
                id: self.data.borrow().len() - 1,
                len: bytes as u64,
                used: self.used.clone(),
            })
        }
        fn copy_in(&self, dst: &mut Block, offset: usize, src: &[u8]) -> Result<(), Failure> {
            self.log
                .borrow_mut()
                .push(format!("copy {offset}..{}", offset + src.len()));
            self.data.borrow_mut()[dst.id][offset..offset + src.len()].copy_from_slice(src);
            Ok(())
        }
        fn finish(&self) -> Result<(), Failure> {
            self.log.borrow_mut().push("finish".into());
            Ok(())
        }
    }

    fn image(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn chunks_cover_the_image_in_order_without_gaps() {
        let c: Vec<_> = chunks(10, 4).collect();
        assert_eq!(c, vec![0..4, 4..8, 8..10]);
        assert_eq!(chunks(8, 4).count(), 2);
        assert_eq!(chunks(0, 4).count(), 0);
        assert_eq!(chunks(3, 0).collect::<Vec<_>>(), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn the_weights_copy_in_chunks_while_the_other_allocations_are_made() {
        let fake = Fake {
            capacity: 1000,
            ..Default::default()
        };
        let img = image(250);
        let p = PageIn::start(&fake, &img, 100).unwrap();
        let kv = p.alloc(300, "the KV cache").unwrap();
        let (w, held) = p.finish().unwrap();
        assert_eq!(
            *fake.log.borrow(),
            [
                "alloc 250",
                "copy 0..100",
                "copy 100..200",
                "copy 200..250",
                "alloc 300",
                "finish"
            ]
        );
        assert_eq!(fake.data.borrow()[w.block.id], img, "the bytes as stored");
        assert_eq!(held.bytes(), 550);
        assert_eq!(*fake.used.borrow(), 550);
        drop(kv);
        assert_eq!(
            held.bytes(),
            250,
            "a dropped allocation is no longer counted"
        );
        drop(w);
        assert_eq!((held.bytes(), *fake.used.borrow()), (0, 0));
    }

    #[test]
    fn out_of_memory_fails_the_load_and_hands_back_everything_it_took() {
        let fake = Fake {
            capacity: 1000,
            ..Default::default()
        };
        // Another copy already on the device.
        let other = PageIn::start(&fake, &image(400), 64).unwrap();
        let (other_w, other_held) = other.finish().unwrap();
        let load = || -> Result<(), MemError> {
            let p = PageIn::start(&fake, &image(300), 64)?;
            let _kv = p.alloc(200, "the KV cache")?;
            let _scratch = p.alloc(200, "the activations")?;
            p.finish().map(drop)
        };
        let err = load().unwrap_err();
        assert_eq!(
            err,
            MemError::OutOfMemory {
                bytes: 200,
                what: "the activations",
                held: 500
            }
        );
        assert!(err.to_string().contains("out of device memory"));
        assert_eq!(*fake.used.borrow(), 400, "only the other copy remains");
        assert_eq!(other_held.bytes(), 400);
        assert_eq!(fake.data.borrow()[other_w.block.id], image(400));
        // The weights alone not fitting fails before any copy is queued.
        let copies = fake.log.borrow().len();
        assert!(matches!(
            PageIn::start(&fake, &image(700), 64).map(drop),
            Err(MemError::OutOfMemory {
                what: "the weights",
                held: 0,
                ..
            })
        ));
        assert_eq!(fake.log.borrow().len(), copies + 1);
    }

    #[test]
    fn an_allocation_failing_on_demand_is_named_and_counted_back() {
        let fake = Fake {
            capacity: u64::MAX,
            fail_at: Some(1),
            ..Default::default()
        };
        let p = PageIn::start(&fake, &image(10), 4).unwrap();
        let e = p.alloc(5, "the KV cache").unwrap_err();
        assert!(matches!(
            e,
            MemError::OutOfMemory {
                what: "the KV cache",
                held: 10,
                ..
            }
        ));
        assert_eq!(p.held.bytes(), 10);
        drop(p);
        assert_eq!(*fake.used.borrow(), 0);
    }
}
