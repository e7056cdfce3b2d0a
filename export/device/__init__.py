"""The on-device path: the tiny ranker, its inputs and int8 embeddings (mobile_sdk/BUNDLE_FORMAT.md)."""
