"""The mlxfleet wire contract; versions live in subpackages (v1)."""
