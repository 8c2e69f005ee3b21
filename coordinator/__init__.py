"""The coordinator: OpenAI-compatible gateway, worker registry, routing, settlement."""

__version__ = "0.1.0"
