"""The cloud receiver: ingest, durable per-channel buffers, connector endpoints."""
