"""The audit: collect what the checks need in one pass over the images (data.py), then run
every check of the registry (checks/) on it, and judge what they measured (findings.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DataError, ModelError, NoRuleError, SettingError, first_line
from ..evaluation.evaluate import Dataset, load_dataset
from ..explainer import Explainer
from ..ir.digest import model_digest
from ..lrp.heatmaps import INPUT, LAST
from ..options import Options, Runtime, resolve
from . import drift as drift_check
from . import examples as shown
from . import sanity
from .checks import NEEDS, REGISTRY, NotRun
from .concepts import ConceptFacts, facts as concept_facts
from .data import CELLS, AuditData, Sample, collect
from .examples import Example, Examples
from .findings import FailOn, Finding, finding
from .identity import activated, identity
from .strategies import ClassStrategies

__all__ = ["CELLS", "Audit", "activated", "audit", "audit_dataset"]


@dataclass
class Audit:
    identity: dict
    classes: list[str]
    files: list[str]  # as given, relative to the data folder where possible
    rows: list[dict]  # per image
    findings: list[Finding]
    examples: Examples | None = None  # the images the report draws (examples.py); None: nothing explained
    strategies: list[ClassStrategies] = field(default_factory=list)
    drift: drift_check.Drift | None = None
    checks: dict = field(default_factory=dict)  # every measured value, by check
    seconds: float = 0.0
    labels: str | None = None  # where the labels came from ("class folders", a labels file), None: unlabeled
    not_run: dict = field(default_factory=dict)  # check -> why it did not run ("no labels")
    details: dict = field(default_factory=dict)  # check -> what it keeps for the report (Outcome.detail)
    concepts: ConceptFacts | None = None  # what the model uses (audit.concepts); None: no concept layer

    @property
    def verdict(self) -> str:
        return "fail" if any(f.severity == "fail" for f in self.findings) else "pass"

    @property
    def based_on(self) -> str:
        """What the verdict rests on: "48 images, labels: class folders", "12 images, labels: none
        (predicted classes)"."""
        labels = self.labels if self.labels is not None else "none (predicted classes)"
        return f"{len(self.files)} images, labels: {labels}"

    def basis(self) -> dict:
        """based_on for machines (report.json)."""
        return {"images": len(self.files), "labels": self.labels,
                "classes": "labelled" if self.labels is not None else "predicted", "text": self.based_on}

    @property
    def randomisation(self) -> sanity.Randomisation | None:
        return self.details.get("randomisation")

    @property
    def random_logit(self) -> float | None:
        return self.checks.get("random-logit")

    @property
    def deployed(self) -> dict | None:
        """The deployed kernels against the reference arithmetic (deployed-kernels)."""
        return self.details.get("deployed-kernels")

    # The maps of the first images (all of them, up to examples.ROWS_SHOWN): the rest are not kept.
    @property
    def pixels(self) -> np.ndarray | None:
        """uint8 [K, H, W, C] as the model saw them."""
        return self.examples.first("pixels") if self.examples is not None else None

    @property
    def heatmaps(self) -> np.ndarray | None:
        """[K, H, W]"""
        return self.examples.first("heatmap") if self.examples is not None else None

    @property
    def other_heatmaps(self) -> np.ndarray | None:
        """[K, H, W], the --against model's"""
        return self.examples.first("other") if self.examples is not None else None


def audit(model: str | Path, data: str | Path, *, options: Options | None = None, runtime: Runtime | None = None,
          labels: str | Path | None = None, masks: str | Path | None = None, against: str | Path | None = None,
          fail_on: FailOn | None = None, faithfulness: bool = False, sanity_images: int = 16,
          limit: int | None = None, progress: Callable[[float], None] | None = None, concepts: str | None = "last",
          **settings: Any) -> Audit:
    """Audit `model` on the images of `data`: ImageFolder layout, flat with a labels file, or a
    flat unlabeled sample (every image under it), audited on the classes the model predicts;
    the checks that need labels (accuracy) then say they did not run (Audit.not_run).
    options, runtime: as Explainer's (or their settings by name: preset=, split=, device=,
    batch_size=, cluster=, ...), for every explainer the audit builds (the model's, the
    --against model's, the randomised copies'). runtime.cluster: explain (and score, and
    compare) the images on Ray actors; the checks then run here on what they return, with the
    same results as in one process. progress(n) is called as images are done (n images' worth
    of work; the calls add up to the number of images), the checks counting as one more image.
    concepts: the layer whose channels are concepts (audit.concepts: per class the concepts its
    predictions rest on, the channels of a Clever Hans region, concept drift with `against`);
    None or "input": none. The default, "last", is left out where a model has no last conv
    block."""
    start = time.perf_counter()
    options, runtime = resolve(options, runtime, settings)
    model, data = Path(model), Path(data)
    fail_on = fail_on or FailOn.parse(None)
    sample = _sample(data, labels, masks, limit)
    conditional = no_concepts = None
    try:
        conditional, no_concepts = _conditional(model, options, runtime, concepts)
        probed = replace(options, probe=conditional.summary.concept_layer) if conditional is not None else options
        explainer = Explainer(model, probed, runtime)
    except NoRuleError as exc:  # the rules check's finding, not a stop
        facts = {"model": str(model), "sha256": model_digest(model), "preset": options.preset.name}
        collected = AuditData(str(model), facts, sample, options, no_rule=str(exc))
    else:
        if len(sample.classes) and len(sample.classes) != explainer.num_classes:
            raise DataError(f"{data}: {len(sample.classes)} classes, but the model has {explainer.num_classes}")
        other = None
        if against is not None:
            # the same layer: "last" is the other model's own; a name, the tensor of that name there
            layer = concepts if concepts == LAST else probed.probe
            try:
                other = Explainer(against, replace(options, probe=layer), runtime)
            except SettingError:  # no such layer there: no concepts to compare
                other = Explainer(against, options, runtime)
            if other.input_shape[1:] != explainer.input_shape[1:]:
                raise ModelError(f"{against}: input {list(other.input_shape[1:])} differs from the audited model's "
                                   f"{list(explainer.input_shape[1:])}")
        collected = collect(model, sample, explainer, other, runtime, facts=identity(model, explainer),
                            against=str(against) if against is not None else None, faithfulness=faithfulness,
                            sanity_images=sanity_images, keep=shown.kept_first(sanity_images), progress=progress,
                            axes=(conditional.summary.concept_axis,) * 2 if conditional is not None else (1, 1))
        if conditional is not None and collected.images is not None:
            found = concept_facts(list(collected.classes), list(zip(sample.files, sample.names)),
                                  collected.images.targets, collected.images.channels, collected.strategies, conditional,
                                  collected.images.other_channels)
            collected = replace(collected, concepts=found)
    findings, checks, not_run, details = judge(collected, fail_on)
    if no_concepts is not None and collected.images is not None:
        not_run["concepts"] = no_concepts
    result = Audit(collected.facts, collected.classes if collected.images is not None else list(sample.classes),
                   list(sample.names), collected.rows(), findings, checks=checks, labels=sample.source,
                   not_run=not_run, details=details)
    result.concepts = collected.concepts
    if collected.images is not None:
        result.strategies, result.drift = collected.strategies, collected.drift
        result.examples = _completed(collected, result, explainer, other, runtime)
        if progress:
            progress(1)
    result.seconds = time.perf_counter() - start
    return result


def _conditional(model: Path, options: Options, runtime: Runtime, layer: str | None) -> tuple[Explainer | None, str | None]:
    """The audited model with the concept layer, run here (a few conditional passes), and why
    there are no concepts where there are none: not asked for, the input (a layer map's --layer
    input: colour channels are no concepts), or the default layer where the model has no last
    conv block (said in Audit.not_run; a layer named and not found is an error)."""
    if layer is None or layer == INPUT:
        return None, None
    try:
        return Explainer(model, replace(options, concept_layer=layer), replace(runtime, cluster=None)), None
    except SettingError as exc:
        if layer == LAST:
            return None, f"no concept layer ({first_line(exc).split(': ', 1)[-1]})"
        raise


def judge(data: AuditData, fail_on: FailOn) -> tuple[list[Finding], dict, dict, dict]:
    """Every check of the registry on the data: (findings, failing ones first; the measured
    values by check; the checks that did not run, and why; the checks' details)."""
    findings: list[Finding] = []
    checks: dict = {}
    not_run: dict = {}
    details: dict = {}
    have = data.available()
    for name, check in REGISTRY.items():
        unmet = next((need for need in check.needs if need not in have), None)
        if unmet is not None:
            if NEEDS[unmet] is not None:
                not_run[name] = NEEDS[unmet]
            continue
        outcome = check.run(data)
        if outcome is None:
            continue
        if isinstance(outcome, NotRun):
            not_run[name] = outcome.why
            continue
        if outcome.recorded:
            checks[name] = outcome.value
        checks.update(outcome.records)
        if outcome.detail is not None:
            details[name] = outcome.detail
        for seen in outcome.observations:
            found = finding(fail_on, name, seen.value, seen.message, seen.class_, list(seen.images))
            if found is not None:
                findings.append(found)
    findings.sort(key=lambda f: (f.severity != "fail", f.check))
    return findings, checks, not_run, details


def _completed(data: AuditData, result: Audit, explainer: Explainer, other: Explainer | None,
               runtime: Runtime) -> Examples:
    """The kept examples, with those the report draws beyond them explained again here (a few
    per finding and per cluster: examples.drawn), for the class explained the first time."""
    missing = sorted(shown.drawn(result.findings, result.strategies, result.drift, list(data.names)) - set(data.examples))
    more: dict[int, Example] = {}
    for start in range(0, len(missing), runtime.batch_size):
        chosen = missing[start:start + runtime.batch_size]
        # onnxruntime's kernels for a batch of one differ in rounding from those for more (as seen
        # on CPU); a kept image rides along so that the maps are those of the audit's batches
        padded = chosen + [0] if len(chosen) == 1 and runtime.batch_size > 1 and 0 in data.examples else chosen
        pixels = explainer.read_images([data.sample.files[i] for i in padded])
        x = explainer.images.normalize(pixels)
        targets = data.images.targets[padded]
        maps = explainer.explain(x, target=targets, warn=False).heatmap()
        theirs = other.explain(x, target=targets, warn=False).heatmap() if other is not None else None
        for j, i in enumerate(chosen):
            more[i] = Example(pixels[j].copy(), maps[j].copy(), None if theirs is None else theirs[j].copy())
    return data.examples.joined(more)


def _sample(data: Path, labels: str | Path | None, masks: str | Path | None, limit: int | None) -> Sample:
    dataset = audit_dataset(data, labels, masks)
    count = min(limit or len(dataset.files), len(dataset.files))
    files = dataset.files[:count]
    return Sample(tuple(files), tuple(_shown(f, data) for f in files),
                  dataset.labels[:count] if dataset.labelled else None, tuple(dataset.masks[:count]),
                  tuple(dataset.classes),
                  None if not dataset.labelled else (str(labels) if labels is not None else "class folders"))


def audit_dataset(data: str | Path, labels: str | Path | None = None, masks: str | Path | None = None) -> Dataset:
    """The images an audit of `data` looks at, with their labels (None for an unlabeled sample:
    a flat folder without a labels file) and masks (evaluate's lookup, in `masks` or data/masks)."""
    return load_dataset(data, labels, masks=masks, need_labels=False)


def _shown(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
