//! Prometheus metrics of the agent, all under the `flatmesh_` prefix in base units.

use prometheus::{
    exponential_buckets, register_gauge_vec_with_registry, register_histogram_vec_with_registry,
    register_histogram_with_registry, register_int_counter_vec_with_registry,
    register_int_gauge_vec_with_registry, register_int_gauge_with_registry, Encoder, GaugeVec,
    Histogram, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder,
};
use prometheus::{
    register_gauge_with_registry, register_int_counter_with_registry, Gauge, IntCounter,
};

/// Every metric family, registered once in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub time_to_first_token_seconds: HistogramVec,
    pub input_tokens: IntCounterVec,
    pub output_tokens: IntCounterVec,
    pub prefix_cache_hits: IntCounterVec,
    pub prefix_cache_tokens: IntCounterVec,
    pub model_load_seconds: HistogramVec,
    pub model_load_failures: IntCounterVec,
    pub model_bytes: IntGaugeVec,
    pub in_flight: IntGaugeVec,
    pub model_unload_seconds: HistogramVec,
    pub cache_miss_seconds: HistogramVec,
    pub evictions: IntCounterVec,
    pub eviction_age_seconds: Histogram,
    pub copies_loaded: IntGauge,
    pub device_used_bytes: IntGaugeVec,
    pub device_capacity_bytes: IntGaugeVec,
    pub device_copies: IntGaugeVec,
    pub device_driver_used_bytes: IntGaugeVec,
    pub queue_wait_seconds: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub rejections: IntCounterVec,
    pub tier_requests: IntCounterVec,
    pub tier_tokens: IntCounterVec,
    pub tier_responses: IntCounterVec,
    pub tier_token_budget: IntGaugeVec,
    pub tier_budget_used_ratio: GaugeVec,
    pub policy_calls: IntCounterVec,
    pub policy_call_seconds: HistogramVec,
    pub policy_reloads: IntCounterVec,
    pub policy_version: IntGaugeVec,
    pub response_cache: IntCounterVec,
    pub page_ins: IntCounterVec,
    pub warm_bytes: IntGauge,
    pub mesh_nodes: IntGauge,
    pub mesh_etcd_errors: IntCounterVec,
    pub mesh_forwarded: IntCounterVec,
    pub mesh_forward_seconds: HistogramVec,
    pub mesh_placements: IntCounterVec,
    pub mesh_copies: IntGaugeVec,
    pub ledger_shipped: IntCounterVec,
    pub ledger_unshipped: IntGauge,
    pub ledger_ship_errors: IntCounter,
    pub ledger_ship_lag_seconds: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let latency = exponential_buckets(0.005, 2.0, 14).expect("valid buckets"); // 5 ms .. 41 s
        let load = exponential_buckets(0.01, 2.0, 14).expect("valid buckets");
        Metrics {
            requests: register_int_counter_vec_with_registry!(
                "flatmesh_requests_total",
                "Requests answered, by model, endpoint and HTTP status.",
                &["model", "endpoint", "status"],
                r
            )
            .expect("register"),
            request_seconds: register_histogram_vec_with_registry!(
                "flatmesh_request_duration_seconds",
                "Time from request to the last byte of the response.",
                &["model", "endpoint"],
                latency.clone(),
                r
            )
            .expect("register"),
            time_to_first_token_seconds: register_histogram_vec_with_registry!(
                "flatmesh_time_to_first_token_seconds",
                "Time from request to the first generated token.",
                &["model"],
                latency,
                r
            )
            .expect("register"),
            input_tokens: register_int_counter_vec_with_registry!(
                "flatmesh_input_tokens_total",
                "Prompt tokens processed.",
                &["model"],
                r
            )
            .expect("register"),
            output_tokens: register_int_counter_vec_with_registry!(
                "flatmesh_output_tokens_total",
                "Tokens generated.",
                &["model"],
                r
            )
            .expect("register"),
            prefix_cache_hits: register_int_counter_vec_with_registry!(
                "flatmesh_prefix_cache_hits_total",
                "Generations whose prompt started with KV blocks from the copy's prefix cache.",
                &["model"],
                r
            )
            .expect("register"),
            prefix_cache_tokens: register_int_counter_vec_with_registry!(
                "flatmesh_prefix_cache_tokens_total",
                "Prompt tokens read from the prefix cache instead of computed.",
                &["model"],
                r
            )
            .expect("register"),
            model_load_seconds: register_histogram_vec_with_registry!(
                "flatmesh_model_load_seconds",
                "Time to load a model into memory.",
                &["model"],
                load,
                r
            )
            .expect("register"),
            model_load_failures: register_int_counter_vec_with_registry!(
                "flatmesh_model_load_failures_total",
                "Model loads that failed, by error kind.",
                &["model", "kind"],
                r
            )
            .expect("register"),
            model_bytes: register_int_gauge_vec_with_registry!(
                "flatmesh_model_bytes",
                "Memory held by a loaded model, measured after load.",
                &["model"],
                r
            )
            .expect("register"),
            in_flight: register_int_gauge_vec_with_registry!(
                "flatmesh_requests_in_flight",
                "Requests being served now.",
                &["model"],
                r
            )
            .expect("register"),
            model_unload_seconds: register_histogram_vec_with_registry!(
                "flatmesh_model_unload_seconds",
                "Time to unload a copy.",
                &["model"],
                exponential_buckets(0.0001, 4.0, 10).expect("valid buckets"),
                r
            )
            .expect("register"),
            cache_miss_seconds: register_histogram_vec_with_registry!(
                "flatmesh_cache_miss_seconds",
                "Time a request waited for its model to load.",
                &["model"],
                exponential_buckets(0.01, 2.0, 14).expect("valid buckets"),
                r
            )
            .expect("register"),
            evictions: register_int_counter_vec_with_registry!(
                "flatmesh_evictions_total",
                "Copies unloaded, by reason (lru, keep_alive, admin, unregistered).",
                &["reason"],
                r
            )
            .expect("register"),
            eviction_age_seconds: register_histogram_with_registry!(
                "flatmesh_eviction_age_seconds",
                "Age of a copy when it was unloaded.",
                exponential_buckets(0.1, 4.0, 10).expect("valid buckets"),
                r
            )
            .expect("register"),
            copies_loaded: register_int_gauge_with_registry!(
                "flatmesh_copies_loaded",
                "Copies of models loaded on this node.",
                r
            )
            .expect("register"),
            device_used_bytes: register_int_gauge_vec_with_registry!(
                "flatmesh_device_used_bytes",
                "Bytes held on a device by copies and loads in progress.",
                &["device"],
                r
            )
            .expect("register"),
            device_capacity_bytes: register_int_gauge_vec_with_registry!(
                "flatmesh_device_capacity_bytes",
                "Bytes a device may hold.",
                &["device"],
                r
            )
            .expect("register"),
            device_copies: register_int_gauge_vec_with_registry!(
                "flatmesh_device_copies",
                "Copies of models on a device (loading or ready).",
                &["device"],
                r
            )
            .expect("register"),
            device_driver_used_bytes: register_int_gauge_vec_with_registry!(
                "flatmesh_device_driver_used_bytes",
                "Bytes in use on a cuda device's GPU as the driver counts them (all processes, all budgets on that GPU).",
                &["device"],
                r
            )
            .expect("register"),
            queue_depth: register_int_gauge_vec_with_registry!(
                "flatmesh_queue_depth",
                "Requests waiting for an execution slot or a place in their copy's batch, by tier.",
                &["tier"],
                r
            )
            .expect("register"),
            queue_wait_seconds: register_histogram_vec_with_registry!(
                "flatmesh_queue_wait_seconds",
                "Time a request waited for an execution slot, by tier.",
                &["tier"],
                exponential_buckets(0.001, 4.0, 10).expect("valid buckets"),
                r
            )
            .expect("register"),
            rejections: register_int_counter_vec_with_registry!(
                "flatmesh_rejections_total",
                "Requests refused before running, by tier and reason.",
                &["tier", "reason"],
                r
            )
            .expect("register"),
            tier_requests: register_int_counter_vec_with_registry!(
                "flatmesh_tier_requests_total",
                "Requests served, by tier.",
                &["tier"],
                r
            )
            .expect("register"),
            tier_tokens: register_int_counter_vec_with_registry!(
                "flatmesh_tier_tokens_total",
                "Tokens processed, by tier and direction (input, output).",
                &["tier", "direction"],
                r
            )
            .expect("register"),
            tier_responses: register_int_counter_vec_with_registry!(
                "flatmesh_tier_responses_total",
                "Requests answered on the serve path, by tier and HTTP status (499 = client went away).",
                &["tier", "status"],
                r
            )
            .expect("register"),
            tier_token_budget: register_int_gauge_vec_with_registry!(
                "flatmesh_tier_token_budget",
                "Tokens a tenant of the tier may use per calendar month (tiers with a budget).",
                &["tier"],
                r
            )
            .expect("register"),
            tier_budget_used_ratio: register_gauge_vec_with_registry!(
                "flatmesh_tier_budget_used_ratio",
                "The largest share of its monthly token budget any tenant of the tier has used (mesh-wide).",
                &["tier"],
                r
            )
            .expect("register"),
            policy_calls: register_int_counter_vec_with_registry!(
                "flatmesh_policy_calls_total",
                "Calls of policy plugins, by slot and result (ok, error, trap, timeout, memory, invalid, unavailable).",
                &["slot", "result"],
                r
            )
            .expect("register"),
            policy_call_seconds: register_histogram_vec_with_registry!(
                "flatmesh_policy_call_seconds",
                "Time of one policy plugin call, by slot.",
                &["slot"],
                exponential_buckets(0.000_002, 2.0, 16).expect("valid buckets"), // 2 µs .. 65 ms
                r
            )
            .expect("register"),
            policy_reloads: register_int_counter_vec_with_registry!(
                "flatmesh_policy_reloads_total",
                "Attempts to load a policy plugin, by slot and result (ok, rejected).",
                &["slot", "result"],
                r
            )
            .expect("register"),
            policy_version: register_int_gauge_vec_with_registry!(
                "flatmesh_policy_version",
                "Version number of the plugin loaded in each slot (counts loads since start).",
                &["slot"],
                r
            )
            .expect("register"),
            response_cache: register_int_counter_vec_with_registry!(
                "flatmesh_response_cache_total",
                "Generation requests looked up in the response cache, by result (hit, miss).",
                &["result"],
                r
            )
            .expect("register"),
            page_ins: register_int_counter_vec_with_registry!(
                "flatmesh_page_ins_total",
                "Model loads by source (disk, warm: the warm tier in host RAM) and result.",
                &["source", "result"],
                r
            )
            .expect("register"),
            warm_bytes: register_int_gauge_with_registry!(
                "flatmesh_warm_bytes",
                "Bytes of prepared weights held in the warm tier.",
                r
            )
            .expect("register"),
            mesh_nodes: register_int_gauge_with_registry!(
                "flatmesh_mesh_nodes",
                "Live nodes of the mesh this node sees, itself included.",
                r
            )
            .expect("register"),
            mesh_etcd_errors: register_int_counter_vec_with_registry!(
                "flatmesh_mesh_etcd_errors_total",
                "etcd sessions that ended in an error (the node retries every second).",
                &["node"],
                r
            )
            .expect("register"),
            mesh_forwarded: register_int_counter_vec_with_registry!(
                "flatmesh_mesh_forwarded_total",
                "Requests forwarded to a peer, by peer node URL and result (ok, error).",
                &["peer", "result"],
                r
            )
            .expect("register"),
            mesh_forward_seconds: register_histogram_vec_with_registry!(
                "flatmesh_mesh_forward_seconds",
                "Time from forwarding a request to the peer's first answer line (it has admitted the request and holds a copy).",
                &["peer"],
                exponential_buckets(0.0005, 2.0, 16).expect("valid buckets"),
                r
            )
            .expect("register"),
            mesh_placements: register_int_counter_vec_with_registry!(
                "flatmesh_mesh_placements_total",
                "Placement decisions of this node, by reason (here, holder, cheaper_holder, scale_out, load_here, load_peer, wait, pinned, confined).",
                &["reason"],
                r
            )
            .expect("register"),
            mesh_copies: register_int_gauge_vec_with_registry!(
                "flatmesh_mesh_copies",
                "Ready copies of a model on the live nodes of the mesh, as this node sees them.",
                &["model"],
                r
            )
            .expect("register"),
            ledger_shipped: register_int_counter_vec_with_registry!(
                "flatmesh_ledger_shipped_records_total",
                "Records shipped to the shared ledger, by result (new; duplicate: there already from a try whose acknowledgement was lost).",
                &["result"],
                r
            )
            .expect("register"),
            ledger_unshipped: register_int_gauge_with_registry!(
                "flatmesh_ledger_unshipped_records",
                "Records in this node's outbox not yet in the shared ledger.",
                r
            )
            .expect("register"),
            ledger_ship_errors: register_int_counter_with_registry!(
                "flatmesh_ledger_ship_errors_total",
                "Shipments to the shared ledger that failed (retried with a doubling wait).",
                r
            )
            .expect("register"),
            ledger_ship_lag_seconds: register_gauge_with_registry!(
                "flatmesh_ledger_ship_lag_seconds",
                "Age of the oldest record not yet in the shared ledger (0 when none waits).",
                r
            )
            .expect("register"),
            registry: r,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
