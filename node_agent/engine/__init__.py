"""The per-model engine process: an OpenAI-compatible HTTP server on mlx-lm's BatchGenerator.

Importing this package (or `protocol`) must not import mlx: the gateway reuses `protocol`.
"""
