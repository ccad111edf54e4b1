"""Evaluation helpers: metrics, feature extraction with an on-disk cache, weighted k-NN, the linear-probe lr grid."""
