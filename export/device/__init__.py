"""Device bundles: the export side of mobile_sdk/BUNDLE_FORMAT.md, and the CDN stand-in (cdn.py)."""
