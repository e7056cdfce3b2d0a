"""Training: datasets from the feature store, two-tower retrieval, teacher and student rankers,
distillation, evaluation. Imports torch (the `train` extra); serving never imports this."""
