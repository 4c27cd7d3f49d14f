"""The OpenAI-compatible HTTP edge, one role per module.

app.py (the aiohttp application and the `Gateway` facade) · openai.py (the OpenAI routes) ·
admission.py (unit, context and rate checks every dialect makes) · forward.py (pick, post,
fail over) with relay.py (continue a broken stream) and flights.py (abort on engine removal) ·
auth.py (team keys, admin and operator tokens, tier choice) · limits.py (key rate limits) ·
record.py (the per-request metrics) · admin.py (the /admin/v1 routes).

Nothing is imported here, so that coordinator.cloud can import gateway.relay without a cycle.
"""
