//! Placement of a new copy: which device, and which idle copies to evict for room — the
//! least valuable first, as the residency policy values them (`residency.rs`).

use std::time::Instant;

/// A device as placement sees it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceRoom {
    pub capacity: u64,
    /// Loaded copies plus reservations of loads in progress.
    pub used: u64,
}

/// A loaded copy as placement sees it.
#[derive(Debug, Clone)]
pub struct Resident<K> {
    pub key: K,
    pub device: usize,
    pub bytes: u64,
    pub last_used: Instant,
    /// What keeping the copy is worth under the residency policy (0 for all under LRU):
    /// lower leaves first; equal values leave least recently used first.
    pub value: f64,
    /// False while leased, pinned, or younger than the minimum residency.
    pub evictable: bool,
}

/// What a residency plugin said about the idle copies, by key.
#[derive(Debug, Clone, PartialEq)]
pub enum Advice<K> {
    /// Nothing: the built-in policy decides.
    BuiltIn,
    /// These leave first, in this order; the others after them, in the built-in order.
    Order(Vec<K>),
    /// Evict nothing (a plugin in a closed slot failed).
    KeepAll,
}

/// Where a new copy goes and what leaves to make room.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan<K> {
    pub device: usize,
    /// Least valuable first.
    pub victims: Vec<K>,
}

/// The device with the most free bytes, if `need` bytes fit there without evicting anything.
pub fn fits_without_eviction(devices: &[DeviceRoom], need: u64) -> Option<usize> {
    let free = |d: &DeviceRoom| d.capacity.saturating_sub(d.used);
    devices
        .iter()
        .enumerate()
        .filter(|(_, d)| free(d) >= need)
        .max_by_key(|(_, d)| free(d))
        .map(|(i, _)| i)
}

/// Choose a device for `need` bytes. A device that fits without eviction wins (the one with
/// the most free bytes); otherwise the device whose evictions are least valuable, evicting
/// its least valuable idle copies (by value, then recency) until the new copy fits. `None` when no device can make
/// room now (everything evictable is leased or pinned).
pub fn place<K: Clone>(
    devices: &[DeviceRoom],
    residents: &[Resident<K>],
    need: u64,
) -> Option<Plan<K>> {
    let free = |d: &DeviceRoom| d.capacity.saturating_sub(d.used);
    if let Some(device) = fits_without_eviction(devices, need) {
        return Some(Plan {
            device,
            victims: Vec::new(),
        });
    }
    // A device's cost is its most valuable victim (value, then recency), then how many leave.
    let mut best: Option<((f64, Instant), usize, Plan<K>)> = None;
    for (i, d) in devices.iter().enumerate() {
        if d.capacity < need {
            continue;
        }
        let mut idle: Vec<&Resident<K>> = residents
            .iter()
            .filter(|r| r.device == i && r.evictable)
            .collect();
        idle.sort_by(|a, b| rank(a).partial_cmp(&rank(b)).expect("values are not NaN"));
        let mut room = free(d);
        let mut victims = Vec::new();
        let mut dearest = None;
        for r in idle {
            if room >= need {
                break;
            }
            room += r.bytes;
            victims.push(r.key.clone());
            dearest = Some(rank(r));
        }
        if room < need {
            continue;
        }
        let dearest = dearest.expect("evicted at least one copy");
        let better = match &best {
            None => true,
            Some((t, n, _)) => (dearest, victims.len()) < (*t, *n),
        };
        if better {
            let n = victims.len();
            best = Some((dearest, n, Plan { device: i, victims }));
        }
    }
    best.map(|(_, _, p)| p)
}

/// Which idle copy leaves first: the least valuable, then the least recently used.
fn rank<K>(r: &Resident<K>) -> (f64, Instant) {
    (if r.value.is_nan() { 0.0 } else { r.value }, r.last_used)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    fn res(
        key: &'static str,
        device: usize,
        bytes: u64,
        last: Instant,
        evictable: bool,
    ) -> Resident<&'static str> {
        Resident {
            key,
            device,
            bytes,
            last_used: last,
            value: 0.0,
            evictable,
        }
    }

    #[test]
    fn fits_without_eviction_on_the_freest_device() {
        let devices = [
            DeviceRoom {
                capacity: 100,
                used: 60,
            },
            DeviceRoom {
                capacity: 100,
                used: 20,
            },
        ];
        let p = place::<&str>(&devices, &[], 30).unwrap();
        assert_eq!(
            p,
            Plan {
                device: 1,
                victims: vec![]
            }
        );
    }

    #[test]
    fn evicts_least_recently_used_idle_copies_first() {
        let t0 = Instant::now();
        let devices = [DeviceRoom {
            capacity: 100,
            used: 100,
        }];
        let residents = [
            res("new", 0, 40, at(t0, 30), true),
            res("old", 0, 30, at(t0, 10), true),
            res("mid", 0, 30, at(t0, 20), true),
        ];
        let p = place(&devices, &residents, 50).unwrap();
        assert_eq!(p.victims, vec!["old", "mid"]);
    }

    #[test]
    fn leased_and_pinned_copies_are_never_victims() {
        let t0 = Instant::now();
        let devices = [DeviceRoom {
            capacity: 100,
            used: 100,
        }];
        let residents = [
            res("busy", 0, 60, at(t0, 1), false),
            res("idle", 0, 40, at(t0, 5), true),
        ];
        assert_eq!(
            place(&devices, &residents, 40).unwrap().victims,
            vec!["idle"]
        );
        assert!(place(&devices, &residents, 50).is_none());
    }

    #[test]
    fn prefers_the_device_whose_victims_are_least_valuable() {
        let t0 = Instant::now();
        let devices = [
            DeviceRoom {
                capacity: 100,
                used: 100,
            },
            DeviceRoom {
                capacity: 100,
                used: 100,
            },
        ];
        let residents = [
            res("a", 0, 100, at(t0, 50), true),
            res("b", 1, 100, at(t0, 5), true),
        ];
        let p = place(&devices, &residents, 80).unwrap();
        assert_eq!(
            p,
            Plan {
                device: 1,
                victims: vec!["b"]
            }
        );
    }

    #[test]
    fn without_eviction_only_a_device_with_free_room_is_chosen() {
        let devices = [
            DeviceRoom {
                capacity: 100,
                used: 90,
            },
            DeviceRoom {
                capacity: 100,
                used: 50,
            },
        ];
        assert_eq!(fits_without_eviction(&devices, 40), Some(1));
        assert_eq!(fits_without_eviction(&devices, 60), None);
    }

    #[test]
    fn a_copy_larger_than_every_device_never_fits() {
        let devices = [DeviceRoom {
            capacity: 100,
            used: 0,
        }];
        assert!(place::<&str>(&devices, &[], 101).is_none());
    }

    #[test]
    fn the_least_valuable_copies_leave_first_whatever_their_recency() {
        let t0 = Instant::now();
        let devices = [DeviceRoom {
            capacity: 100,
            used: 100,
        }];
        let valued = |key, last, value| Resident {
            value,
            ..res(key, 0, 50, at(t0, last), true)
        };
        let residents = [valued("steady", 1, 9.0), valued("one-off", 20, 1.0)];
        assert_eq!(
            place(&devices, &residents, 50).unwrap().victims,
            vec!["one-off"]
        );
    }
}
