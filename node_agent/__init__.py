"""The node agent: probes, mDNS, coordinator client, engine supervisor and the engine."""
