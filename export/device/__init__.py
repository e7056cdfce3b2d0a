"""Device bundles: what a phone needs to rank on its own, signed, content-addressed, for a CDN.

The format is mobile_sdk/BUNDLE_FORMAT.md: the one contract with the SDK, which imports
nothing from here."""
