"""The audit: explain every image once, then run the checks on what came out."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..errors import NoRuleError, OnnxLrpError
from ..evaluation.evaluate import Dataset, load_dataset, load_mask
from ..explainer import Explainer, Portable
from ..ir.digest import model_digest
from ..lrp import reach
from ..runtime.cluster import Cluster, batches_of, connected, map_batches
from . import drift as drift_check
from . import sanity
from .findings import FailOn, Finding, finding
from .identity import identity, output_step, own_logits, own_session, reference_session
from .statistics import downsized, image_statistics, rank_correlation
from .strategies import ClassStrategies, class_strategies

#: grid the heatmaps are downsized to for the per-class checks
CELLS = 16


@dataclass
class Audit:
    identity: dict
    classes: list[str]
    files: list[str]  # as given, relative to the data folder where possible
    rows: list[dict]  # per image
    findings: list[Finding]
    pixels: np.ndarray | None = None  # uint8 [N, H, W, C] as the model saw them
    heatmaps: np.ndarray | None = None  # [N, H, W]
    strategies: list[ClassStrategies] = field(default_factory=list)
    randomisation: sanity.Randomisation | None = None
    random_logit: float | None = None
    drift: drift_check.Drift | None = None
    other_heatmaps: np.ndarray | None = None
    checks: dict = field(default_factory=dict)  # every measured value, by check
    seconds: float = 0.0
    labels: str | None = None  # where the labels came from ("class folders", a labels file), None: unlabeled
    not_run: dict = field(default_factory=dict)  # check -> why it did not run ("no labels")
    deployed: dict | None = None  # the deployed kernels against the reference arithmetic (deployed-kernels)

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


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def activated(logits: np.ndarray, activation: str | None) -> np.ndarray:
    """The model's output from the relevance graph's logits: the output activation canonicalisation
    stripped (Summary.output_activation: Softmax, LogSoftmax, Sigmoid), or the logits themselves."""
    z = np.asarray(logits, dtype=np.float64)
    if activation is None:
        return z
    if activation == "Softmax":
        return _softmax(z)
    if activation == "LogSoftmax":
        shifted = z - z.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    if activation == "Sigmoid":
        return 1 / (1 + np.exp(-z))
    raise OnnxLrpError(f"unknown output activation '{activation}'")


def _confidences(logits: np.ndarray, activation: str | None) -> np.ndarray:
    """Per image and class, the probability the model gives: a one-logit Sigmoid head's sigmoid,
    else the softmax of the logits (whatever the model's own output is)."""
    return activated(logits, "Sigmoid") if activation == "Sigmoid" else _softmax(np.asarray(logits, np.float64))


def audit(model: str | Path, data: str | Path, *, labels: str | Path | None = None, masks: str | Path | None = None,
          against: str | Path | None = None, preset: str = "epsilon-plus-flat", split: str | None = None,
          include_identity: bool | None = None, bias: bool = True, low: float | list[float] | None = None,
          high: float | list[float] | None = None, precision: str = "fp32", rules: Mapping | None = None,
          preprocessing: str = "imagenet", image_size: tuple[int, int] | None = None, heatmap: str = "pixel",
          layer: str = "last", fail_on: FailOn | None = None,
          faithfulness: bool = False, sanity_images: int = 16, limit: int | None = None, batch_size: int = 16,
          device: str = "cpu", threads: int | None = None, progress: Callable[[float], None] | None = None,
          cluster: Cluster | None = None) -> Audit:
    """Audit `model` on the images of `data`: ImageFolder layout, flat with a labels file, or a
    flat unlabeled sample (every image under it), audited on the classes the model predicts;
    the checks that need labels (accuracy) then say they did not run (Audit.not_run).
    progress(n) is called as images are done (n images' worth of work; the calls add up to the
    number of images), the checks after the explanations counting as one more image.
    cluster: explain (and score, and compare) the images on Ray actors (runtime.cluster); the
    checks then run here on what they return, with the same results as in one process.
    heatmap, layer: the map the checks look at (Explainer's heatmap=: pixel, layer, gated).
    include_identity, bias, low, high, precision, rules: as Explainer's, for every explainer the
    audit builds (the model's, the --against model's, the randomised copies'). threads:
    onnxruntime's intra-op threads in this process (default: its own choice)."""
    start = time.perf_counter()
    model, data = Path(model), Path(data)
    fail_on = fail_on or FailOn.parse(None)
    dataset = audit_dataset(data, labels, masks)
    count = min(limit or len(dataset.files), len(dataset.files))
    files = dataset.files[:count]
    truth = dataset.labels[:count] if dataset.labelled else None
    mask_files = dataset.masks[:count]
    source = None if not dataset.labelled else (str(labels) if labels is not None else "class folders")
    names = [_shown(f, data) for f in files]
    settings = dict(preset=preset, split=split, include_identity=include_identity, bias=bias, low=low, high=high,
                    precision=precision, rules=rules, preprocessing=preprocessing, image_size=image_size,
                    heatmap=heatmap, layer=layer, device=device, threads=threads)
    try:
        explainer = Explainer(model, **settings)
    except NoRuleError as exc:  # the rules check's finding, not a stop
        facts = {"model": str(model), "sha256": model_digest(model), "preset": preset}
        failed = Finding("rules", "fail" if fail_on.fails("rules") else "warning", str(exc), 1.0,
                         fail_on.threshold("rules"))
        return Audit(facts, dataset.classes, names, [], [failed], checks={"rules": 1}, seconds=time.perf_counter() - start,
                     labels=source)
    if len(dataset.classes) and len(dataset.classes) != explainer.num_classes:
        raise OnnxLrpError(f"{data}: {len(dataset.classes)} classes, but the model has {explainer.num_classes}")
    facts = identity(model, explainer)
    height, width = explainer.summary.height, explainer.summary.width
    other = None
    if against is not None:
        other = Explainer(against, **settings)
        if other.input_shape[1:] != explainer.input_shape[1:]:
            raise OnnxLrpError(f"{against}: input {list(other.input_shape[1:])} differs from the audited model's "
                               f"{list(explainer.input_shape[1:])}")

    # 1. Explain every image once (progress over the images): in this process, or batch by
    # batch on Ray actors; the batches are the same either way, and so are the numbers.
    job = Job(explainer.portable(), str(model), batch_size, faithfulness,
              other.portable() if other is not None else None)
    batches = batches_of(files, batch_size)
    if cluster is None:
        run = job.open(device, threads, explainer, other)
        parts = []
        for batch in batches:
            parts.append(run(batch))
            if progress:
                progress(len(batch))
    else:
        with connected(cluster) as ray:
            shipped = replace(job, explainer=job.explainer.stored(ray),
                              against=job.against.stored(ray) if job.against is not None else None)
            parts = map_batches(shipped, batches, cluster, device, progress)
    joined = {key: np.concatenate([part[key] for part in parts]) for key in parts[0] if key != "faithfulness"}
    pixels, heatmaps, logits, targets = joined["pixels"], joined["heatmaps"], joined["logits"], joined["targets"]
    initial, sums, merge_sums, own = joined["initial"], joined["input_sum"], joined["merge_sums"], joined["own_logits"]
    deployed_own = joined["deployed_logits"]
    nonfinite = [int(i) for i in np.flatnonzero(joined["exploded"])]
    x_all = explainer.images.normalize(pixels)
    masks_loaded = [load_mask(m, height, width) for m in mask_files]
    classes = dataset.classes or [str(k) for k in range(explainer.num_classes)]
    findings: list[Finding] = []
    checks: dict = {}
    not_run: dict = {}
    activation = explainer.summary.output_activation

    def add(found: Finding | None) -> None:
        if found is not None:
            findings.append(found)

    # 2. Integrity: the explainer's logits are the model's own; no NaN/Inf; conservation.
    # Like with like: the relevance graph's logits, through the output activation the model ends
    # in (a field of the summary), against the model run in the same arithmetic (reference_session:
    # graph optimisations off, so an int8 model's reference Q/DQ arithmetic on any CPU).
    ours = activated(logits, activation)
    difference = float(np.abs(ours - own).max())
    step = output_step(model)
    # allowed: float32 rounding, 1e-4 of the largest output (rounding of ~6e-8 relative per op, grown
    # over the layers' sums, stays far below); for an int8 output one quantisation step more: a
    # float32 rounding difference before the last QuantizeLinear can tip an x.5 tie the other way
    allowed = 1e-4 * float(np.abs(own).max()) + (step or 0.0)
    checks["logits"] = logit_error = difference / max(allowed, 1e-30)
    what = f"one quantisation step ({step:.3g})" if step and step >= allowed / 2 else "1e-4 of the largest output"
    add(finding(fail_on, "logits", logit_error, f"the explainer's logits differ from the model's own (reference "
                                                f"arithmetic) by {difference:.2e}, {logit_error:.1f} x {what}"))
    # The deployed kernels (default optimisations: fused int8 kernels) against that reference: a
    # separate, informational figure, in output steps (int8) or 1e-4 of the largest output.
    kernel_difference = float(np.abs(deployed_own.astype(np.float64) - own).max())
    unit, per = (("output quantisation steps", step) if step else
                 ("1e-4 of the largest output", 1e-4 * float(np.abs(own).max())))
    checks["deployed-kernels"] = kernels = kernel_difference / max(per, 1e-30)
    deployed = {"max_difference": kernel_difference, "value": kernels, "unit": unit,
                "reference": "onnxruntime, graph optimisations off (reference arithmetic)",
                "deployed": "onnxruntime, default optimisations"}
    add(finding(fail_on, "deployed-kernels", kernels,
                f"onnxruntime's deployed kernels (default optimisations) give outputs {kernel_difference:.2e} "
                f"({kernels:.1f} {unit}) away from the reference arithmetic the audit explains: the deployed "
                "model computes something else than the one audited on this CPU"))
    checks["nonfinite"] = len(nonfinite)
    add(finding(fail_on, "nonfinite", len(nonfinite), f"{len(nonfinite)} image(s) whose relevance exploded "
                "(NaN/Inf set to 0, or totals far beyond the initial relevance)", images=[names[i] for i in nonfinite]))
    # How much of the explained logit reaches the input, and where the rest went.
    reached = np.asarray(joined["reach"], np.float64)
    if np.isfinite(reached).any():
        finite = np.isfinite(reached)
        checks["reach"] = median = float(np.median(reached[finite]))
        taken = np.median(np.asarray(joined["taken"], np.float64)[finite], axis=0)
        checks["reach_taken"] = {family: float(t) for family, t in zip(reach.FAMILIES, taken)}
        worst = [names[i] for i in np.argsort(np.where(finite, reached, np.inf))[:6]]
        advice = reach.advice(explainer.options.bias, taken[None], explainer.options.preset.name)
        add(finding(fail_on, "reach", median, f"only {reach.describe(median, taken)} (median over {int(finite.sum())} "
                    f"images): the heatmaps are drawn from that remainder; {advice}", images=worst))
    else:
        not_run["reach"] = "gradients conserve nothing"
    # Conservation as the rules promise it: every split hands on all it gets (R = R_skip + R_main,
    # per merge); the totals per image only where no bias absorbs relevance.
    conservation = np.abs(sums - initial) / np.maximum(np.abs(initial), 1e-30)
    conserving = explainer.options.preset.initial != "one" and explainer.options.split.method != "copy"
    if conserving and merge_sums.size:
        totals = merge_sums[..., 0].astype(np.float64)
        with np.errstate(invalid="ignore"):
            per_merge = np.abs(totals - merge_sums[..., 1] - merge_sums[..., 2]) / np.maximum(np.abs(totals), 1e-30)
        per_merge = np.nan_to_num(per_merge, nan=np.inf).max(axis=1)
    else:
        per_merge = np.zeros(count)
    promised = per_merge if explainer.options.bias else np.maximum(per_merge, conservation)
    checks["conservation"] = float(promised.max()) if conserving else None
    if conserving:
        worst = np.argsort(-promised)[:6]
        where = "at a residual merge" if explainer.options.bias else "between the output and the input, or at a merge"
        # without biases, what is still lost is the stabilisers' (z+ denominators that vanish)
        hint = (f"; --preset {reach.CONSERVING} hands on what the stabilisers take"
                if not explainer.options.bias and explainer.options.preset.name != reach.CONSERVING else "")
        add(finding(fail_on, "conservation", float(promised.max()),
                    f"relevance is not conserved {where}: off by up to {promised.max():.1%}{hint}",
                    images=[names[i] for i in worst]))

    # 3. Per image.
    probabilities = _confidences(logits, activation)
    rows = []
    for i in range(count):
        label = int(truth[i]) if truth is not None else None
        row = {"image": names[i], "label": classes[label] if label is not None else None,
               "prediction": classes[int(targets[i])], "confidence": float(probabilities[i, targets[i]]),
               "correct": None if label is None else bool(label == targets[i]),
               "initial_relevance": float(initial[i]), "conservation_error": float(conservation[i]),
               **image_statistics(heatmaps[i], masks_loaded[i])}
        rows.append(row)
    for row, scores in zip(rows, (s for part in parts for s in part.get("faithfulness", ()))):
        row.update({f"exact_{k}": v for k, v in scores.items()})
    labelled = [r["correct"] for r in rows if r["correct"] is not None]
    if not dataset.labelled:
        not_run["accuracy"] = "no labels"
    elif labelled:
        checks["accuracy"] = float(np.mean(labelled))
        wrong = [r["image"] for r in rows if r["correct"] is False][:12]
        add(finding(fail_on, "accuracy", checks["accuracy"], f"accuracy {checks['accuracy']:.1%}", images=wrong))

    # 4. Strategies per class (by the class the model predicts).
    grids = np.stack([downsized(h, CELLS) for h in heatmaps])
    strategies = []
    for k, name in enumerate(classes):
        members = [i for i in range(count) if targets[i] == k]
        if len(members) < 3:
            continue
        found = class_strategies(name, members, grids, masks_loaded, CELLS)
        strategies.append(found)
        add(finding(fail_on, "clever-hans", found.hans_score,
                    f"class '{name}': {found.hans_score:.0%} of the relevance sits in one small region "
                    f"({found.region_area:.1%} of the image) across its images", name,
                    [names[i] for i in found.hans_images]))
        if len(found.clusters) > 1:
            add(finding(fail_on, "strategies", found.eigengap,
                        f"class '{name}': its heatmaps fall into {len(found.clusters)} separate strategies "
                        f"({', '.join(str(len(c)) for c in found.clusters)} images)", name,
                        [names[c[0]] for c in found.clusters]))
    checks["clever-hans"] = {s.name: s.hans_score for s in strategies}
    checks["strategies"] = {s.name: s.eigengap for s in strategies}

    # 5. Sanity of the explainer, on the first images.
    subset = list(range(min(sanity_images, count)))

    def explain_with(path, x, chosen):
        other = Explainer(path, **settings, cache=False)
        return other.explain(x, target=chosen, batch_size=batch_size, warn=False).heatmap()

    randomised = None
    if subset:
        randomised = sanity.randomisation(model, explain_with, x_all[subset], targets[subset], heatmaps[subset])
        if randomised.steps:
            checks["randomisation"] = {label: corr for label, _, corr in randomised.steps}
            add(finding(fail_on, "randomisation", randomised.final,
                        f"with every layer's weights randomised, the heatmaps keep a rank correlation of "
                        f"{randomised.final:.2f} with the model's own: they say little about the model"))
    random_logit = None
    if subset and explainer.num_classes < 2:
        not_run["random-logit"] = "one output (no other class to explain)"
    elif subset:
        others = sanity.other_classes(targets[subset], explainer.num_classes)
        other_maps = explainer.explain(x_all[subset], target=others, batch_size=batch_size, warn=False).heatmap()
        random_logit = float(np.mean([rank_correlation(np.abs(a), np.abs(b))
                                      for a, b in zip(heatmaps[subset], other_maps)]))
        checks["random-logit"] = random_logit
        add(finding(fail_on, "random-logit", random_logit,
                    f"explaining a random other class gives nearly the same maps (rank correlation "
                    f"{random_logit:.2f}): the explanations barely depend on the class"))

    # 6. Drift against another model (explained with the images above).
    drift = other_heatmaps = None
    if other is not None:
        other_heatmaps = joined["other_heatmaps"]
        drift = drift_check.compare(str(against), targets, joined["other_logits"].argmax(axis=1), heatmaps,
                                    other_heatmaps)
        checks["drift-agreement"], checks["drift-explanation"] = drift.agreement, drift.correlation
        changed = [names[i] for i in drift.most_changed()]
        add(finding(fail_on, "drift-agreement", drift.agreement,
                    f"the other model predicts {drift.agreement:.1%} of the images alike", images=changed))
        add(finding(fail_on, "drift-explanation", drift.correlation,
                    f"the two models' heatmaps have a mean rank correlation of {drift.correlation:.2f}",
                    images=changed))
        for row, compared in zip(rows, drift.per_image):
            row.update({f"drift_{k}": (classes[v] if k == "other_prediction" else v) for k, v in compared.items()})
    if progress:
        progress(1)
    findings.sort(key=lambda f: (f.severity != "fail", f.check))
    return Audit(facts, classes, names, rows, findings, pixels, heatmaps, strategies, randomised, random_logit,
                 drift, other_heatmaps, checks, time.perf_counter() - start, source, not_run, deployed)


def audit_dataset(data: str | Path, labels: str | Path | None = None, masks: str | Path | None = None) -> Dataset:
    """The images an audit of `data` looks at, with their labels (None for an unlabeled sample:
    a flat folder without a labels file) and masks (evaluate's lookup, in `masks` or data/masks)."""
    return load_dataset(data, labels, masks=masks, need_labels=False)


def _shown(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Job:
    """What auditing a batch of image files needs, picklable for Ray actors: the compiled
    explainer, the model file (its own logits, and the Insertion/Deletion curves), and the
    other model's compiled explainer for drift."""

    explainer: Portable
    model: str
    batch_size: int
    faithfulness: bool = False
    against: Portable | None = None

    def open(self, device: str = "cpu", threads: int | None = None, explainer: Explainer | None = None,
             other: Explainer | None = None) -> Callable[[list[Path]], dict]:
        """A worker: a batch of files -> arrays per image (explainers given are used as they are)."""
        from ..evaluation import metrics
        from ..evaluation.baselines import Forward

        explainer = explainer or self.explainer.open(device, threads)
        if self.against is not None:
            other = other or self.against.open(device, threads)
        image, size = explainer.summary.image, self.batch_size
        size_asked = (explainer.summary.height, explainer.summary.width)  # the explainer's, --size or the model's
        forward = Forward(self.model, device=device, image_size=size_asked, threads=threads) if self.faithfulness else None
        shape = (1, explainer.summary.height, explainer.summary.width, image.channels)
        black = explainer.images.normalize(np.zeros(shape, np.uint8))[0]
        # the model's own output twice: in the reference arithmetic (the integrity gate) and with
        # the deployed kernels (reported beside it)
        reference = reference_session(Path(self.model), device, threads)
        plain = own_session(Path(self.model), device, threads)

        def run(files: list[Path]) -> dict:
            pixels = explainer.read_images(files)
            x = explainer.images.normalize(pixels)
            result = explainer.explain(x, batch_size=size, warn=False)
            heatmaps = result.heatmap()
            exploded = np.zeros(len(x), dtype=bool)
            exploded[list(result.explosion.indices if result.explosion else ())] = True
            out = {"pixels": pixels, "heatmaps": heatmaps, "logits": result.logits, "targets": result.targets,
                   "initial": result.initial, "input_sum": result.input_sum, "merge_sums": result.merge_sums,
                   "exploded": exploded, "own_logits": own_logits(reference, x, size),
                   # share at the input and what each family of ops took (NaN: gradients)
                   "reach": result.reach if result.absorbed_by is not None else np.full(len(x), np.nan),
                   "taken": (result.taken_shares if result.absorbed_by is not None
                             else np.full((len(x), len(reach.FAMILIES)), np.nan)),
                   "deployed_logits": own_logits(plain, x, size)}
            if forward is not None:  # Insertion and Deletion, tie-robust protocol ("exact")
                out["faithfulness"] = [
                    metrics.insertion_deletion(forward.probabilities, x[i], heatmaps[i], int(result.targets[i]), black,
                                               "exact", image.layout).scores for i in range(len(x))]
            if other is not None:
                theirs = other.explain(x, target=result.targets, batch_size=size, warn=False)
                out["other_heatmaps"], out["other_logits"] = theirs.heatmap(), theirs.logits
            return out

        return run
