"""Precise prefix-cache state from vLLM KV-cache events.

``decode``     wire format → typed events (both vLLM event encodings, int or bytes hashes)
``index``      block key → endpoints (tiers), built from events, keyed by the picker's own hash
``keys``       the picker's chained block keys
``table``      the flat uint64 hash table the index is made of; ``owners``: who holds a key
``recovery``   re-anchoring orphaned blocks from routed requests (``anchor``: vLLM's hash
               recipes, where an event's blocks sit in a request)
``replay``     the engine's replay socket: inactivity timeout, retries, contiguity
``subscriber`` one ZMQ SUB per endpoint: sequence tracking, gap replay, restart / reconnect
               detection, resync
``manager``    follows the datastore: one subscriber per endpoint, purge on removal

Every picker replica subscribes to every pod, so all replicas converge on the same view
(see docs/precise-prefix.md).
"""
