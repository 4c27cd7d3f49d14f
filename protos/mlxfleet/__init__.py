"""The contract both sides speak: the gRPC wire (`mlxfleet.v1`) and the Python facts the
coordinator and the node agent must agree on (tiers and knobs, KV cache rules, the OpenAI wire
shapes, node facts, join tokens, mDNS records). Imports nothing from either side."""
