"""Evaluating attribution methods: metrics, baselines, the `evaluate` run over a labelled folder."""
