"""The metrics contract (issue 6), copied from it: the names the agent and coordinator serve."""

from __future__ import annotations

# What the agent re-exports from each engine's GET /v1/engine/stats, while the engine runs.
ENGINE_STATS_METRICS = {
    "mlxfleet_engine_queue_depth",
    "mlxfleet_engine_batch_size",
    "mlxfleet_engine_max_batch_size",
    "mlxfleet_engine_batch_window_seconds",
    "mlxfleet_engine_max_concurrency",
    "mlxfleet_engine_kv_quantization",
    "mlxfleet_engine_requests_total",
    "mlxfleet_engine_generation_tokens_total",
    "mlxfleet_engine_prefix_cache_bytes",
    "mlxfleet_engine_prefix_cache_budget_bytes",
    "mlxfleet_engine_prefix_cache_entries",
    "mlxfleet_engine_prefix_cache_hits_total",
    "mlxfleet_engine_prefix_cache_misses_total",
    "mlxfleet_engine_prefix_cache_saved_tokens_total",
}
# What the agent serves of each group rank on its node (issue 19): the rank's layers, memory
# and decode steps from its stats' `group` block, and the group's bytes through the rank link.
GROUP_RANK_METRICS = {
    "mlxfleet_group_rank_info",
    "mlxfleet_group_rank_rss_bytes",
    "mlxfleet_group_steps_total",
    "mlxfleet_group_step_seconds_total",
    "mlxfleet_group_link_bytes_total",
}
# Every metric name of the contract: a dashboard may use no other.
CONTRACT_METRICS = {
    # coordinator
    "mlxfleet_requests_total",
    "mlxfleet_prompt_tokens_total",
    "mlxfleet_generation_tokens_total",
    "mlxfleet_failovers_total",
    "mlxfleet_engine_exits_total",
    "mlxfleet_trigger_events_total",
    "mlxfleet_ttft_seconds",
    "mlxfleet_time_per_output_token_seconds",
    "mlxfleet_request_duration_seconds",
    "mlxfleet_in_flight_requests",
    "mlxfleet_waiting_requests",
    "mlxfleet_engine_wait_seconds",
    "mlxfleet_coordinator_asyncio_tasks",
    "mlxfleet_nodes",
    "mlxfleet_node_info",
    "mlxfleet_agent_info",
    "mlxfleet_units",
    "mlxfleet_unit_replicas",
    "mlxfleet_placements",
    "mlxfleet_unit_pending",
    # model files (issue 18)
    "mlxfleet_node_disk_room_bytes",
    "mlxfleet_model_files_bytes",
    "mlxfleet_model_copy_bytes",
    "mlxfleet_model_copy_size_bytes",
    "mlxfleet_model_copy_rate_bytes_per_second",
    "mlxfleet_agent_copy_bytes_total",
    "mlxfleet_agent_disk_room_bytes",
    "mlxfleet_agent_model_files_bytes",
    "mlxfleet_trigger_active",
    "mlxfleet_router_deployments",
    "mlxfleet_router_cooldowns",
    "mlxfleet_tier_max_concurrency",
    "mlxfleet_tier_batch_window_seconds",
    "mlxfleet_tier_max_batch_size",
    "mlxfleet_tier_queue_limit",
    # groups: one model over several nodes (issue 19)
    "mlxfleet_group_member_bytes",
    *GROUP_RANK_METRICS,
    # agent
    "mlxfleet_node_memory_total_bytes",
    "mlxfleet_node_memory_available_bytes",
    "mlxfleet_node_memory_wired_bytes",
    "mlxfleet_node_memory_compressed_bytes",
    "mlxfleet_node_swap_used_bytes",
    "mlxfleet_node_memory_pressure_level",
    "mlxfleet_node_thermal_level",
    "mlxfleet_node_power_source",
    "mlxfleet_node_low_power_mode",
    "mlxfleet_node_gpu_wired_limit_bytes",
    "mlxfleet_node_oom_kills_total",
    "mlxfleet_agent_connected",
    "mlxfleet_agent_asyncio_tasks",
    "mlxfleet_engine_state",
    "mlxfleet_engine_rss_bytes",
    *ENGINE_STATS_METRICS,
}
CONTRACT_HISTOGRAMS = {
    "mlxfleet_ttft_seconds",
    "mlxfleet_time_per_output_token_seconds",
    "mlxfleet_request_duration_seconds",
    "mlxfleet_engine_wait_seconds",
}
