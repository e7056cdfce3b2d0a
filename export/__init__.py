"""Artifacts that leave training: ONNX models, the ScaNN index, releases, device bundles.

Modules the server loads (release, index) import no torch."""
