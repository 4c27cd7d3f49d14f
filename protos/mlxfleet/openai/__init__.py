"""The OpenAI wire: request validation (protocol.py), response and SSE shapes (responses.py).

The gateway and the engines both run it, so it stays free of mlx and of any engine state."""
