"""Code used by both the cloud and the connector: config models, frames, output modules."""
