"""``epp usage``: who used what, per tenant and tier, over a period — the report a flat-rate
"LLM as a service" publishes to its members. Reads the picker's per-tenant counters from a
Prometheus-compatible query API (any period) or from a picker's own /metrics (since start)."""
