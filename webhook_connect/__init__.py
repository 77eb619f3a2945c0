"""Webhook Connect: a self-hosted cloud-to-local webhook relay.

One import package with three parts, each a top-level folder of the repository that the build
configuration (``pyproject.toml``) maps into this namespace:

- :mod:`webhook_connect.cloud`: the receiver (ingest, durable buffers, connector endpoints);
- :mod:`webhook_connect.connector`: the agent that dials out and delivers locally;
- :mod:`webhook_connect.shared`: what both use (frames, config models, output modules).

:mod:`webhook_connect.cli` sits above them: it is the only module that imports both sides.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("webhook-connect")
except PackageNotFoundError:  # pragma: no cover - running from a checkout that is not installed
    __version__ = "0.0.0"
