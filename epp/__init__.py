"""epp: endpoint picker for LLM inference (Envoy ext_proc)."""
__version__ = "0.1.0"
