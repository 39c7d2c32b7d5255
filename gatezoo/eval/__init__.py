"""Evaluation: metrics, decoding helpers and kernel microbenchmarks (:mod:`gatezoo.eval.bench`)."""
