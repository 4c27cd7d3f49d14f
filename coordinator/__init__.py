"""The mlxfleet coordinator: node registry, placement, routing and the OpenAI gateway."""

__version__ = "0.1.0"
