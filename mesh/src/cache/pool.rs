//! The node's pool as built from its config: host devices and budgets on CUDA GPUs, with
//! their execution lanes.

use std::{collections::BTreeMap, sync::Arc};

use flatmesh_runtime::{Device, DeviceKind, Lane};

use super::config::DeviceConfig;

/// The configured devices: host devices share one lane (the same cores); the budgets of one
/// GPU share that GPU's lane.
pub fn build(devices: &[DeviceConfig]) -> Vec<Arc<Device>> {
    let host_lane = Lane::new();
    let mut gpu_lanes: BTreeMap<usize, Lane> = BTreeMap::new();
    devices
        .iter()
        .map(|d| {
            let (kind, lane) = match (d.kind.as_str(), d.gpu) {
                ("cuda", gpu) => {
                    let ordinal = gpu.unwrap_or(0);
                    let lane = gpu_lanes.entry(ordinal).or_insert_with(Lane::gpu).clone();
                    (DeviceKind::Cuda { ordinal }, lane)
                }
                _ => (DeviceKind::Host, host_lane.clone()),
            };
            Arc::new(Device::new(kind, d.name.clone(), d.capacity.bytes(), lane))
        })
        .collect()
}
