"""Precise prefix-cache state from vLLM KV-cache events.

``decode``     wire format → typed events (both vLLM event encodings, int or bytes hashes)
``index``      block key → pods (tiers), built from events, keyed by the picker's own hash
``subscriber`` one ZMQ SUB per endpoint, sequence tracking, replay / resync on gaps
``manager``    follows the datastore: one subscriber per endpoint, purge on removal

Every picker replica subscribes to every pod, so all replicas converge on the same view
(see docs/precise-prefix.md).
"""
