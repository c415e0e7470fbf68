"""Deployment audits: checks over a folder of images on the exact model file that is deployed.

    run.py         the audit: explain every image once, then run the checks on the results
    identity.py    what was audited (file hash, producer, opset, input, runtime, rules) and
                   whether the compiled explainer is faithful to the model (logits, NaN, conservation)
    statistics.py  per image: prediction, confidence, relevance statistics, mask metrics
    strategies.py  per class: SpRAy clustering of the heatmaps, and "Clever Hans" regions
    sanity.py      model-parameter randomisation and random-logit tests of the explainer
    drift.py       against another model file: predictions and explanations compared
    findings.py    findings, the checks' thresholds (--fail-on) and the verdict
    report.py      report.html (a person reads it), report.json (a pipeline gates on it), per-image CSV
"""
from .findings import CHECKS, Finding, FailOn
from .run import Audit, audit

__all__ = ["Audit", "CHECKS", "FailOn", "Finding", "audit"]
