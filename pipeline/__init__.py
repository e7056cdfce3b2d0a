"""The layer above models/ and export/: training a release (train.py: models, then their
export, quantisation, index and the release folder) and evaluating one (evaluate.py,
protocol_eval.py, device_eval.py). models/ never imports export/, so neither imports the
other in a circle; tests/test_layering.py reads every import from the source."""
