"""Deployment audits: checks over a folder of images on the exact model file that is deployed.

    run.py         the audit: collect, run every check, judge what they measured
    data.py        what is collected in one pass over the images, reduced per batch (AuditData)
    checks/        the checks, one class each (name, threshold, needs, run), found by their registry
    findings.py    findings, the checks' thresholds (--fail-on) and the verdict
    examples.py    the bounded set of images and heatmaps the report draws
    identity.py    what was audited (file hash, producer, opset, input, runtime, rules), and the
                   model's own outputs the integrity checks compare with
    statistics.py  per image: relevance statistics, mask metrics, map comparisons
    strategies.py  per class: SpRAy clustering of the heatmaps, and "Clever Hans" regions
    sanity.py      model-parameter randomisation and random-logit tests of the explainer
    drift.py       against another model file: predictions and explanations compared
    report.py      report.html (a person reads it), report.json (a pipeline gates on it), per-image CSV
"""
from .findings import CHECKS, Finding, FailOn
from .run import Audit, audit

__all__ = ["Audit", "CHECKS", "FailOn", "Finding", "audit"]
