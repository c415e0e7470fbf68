"""The audit's outputs: report.html for people, report.json for pipelines, images.csv per image.

The HTML is one self-contained file: images are inline PNG data URIs, styles inline, no
script, nothing loaded from elsewhere. Everything that comes from the data or the model
(file names, class names, metadata) goes through Jinja2's autoescaping.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..io.files import Outputs
from ..io.image import colorize, data_uri, render, thumbnail
from ..lrp import reach
from . import examples as shown
from .findings import CHECKS
from .run import Audit
from .strategies import SMALL_REGION

SCHEMA_VERSION = "1.0"
SCHEMA = Path(__file__).with_name("report.schema.json")  # the fixed part of schema()
FILES = ("report.html", "report.json", "images.csv")
THUMBNAIL = 128
CONCEPT_THUMBNAIL = 64
_png = data_uri


def _thumb(picture: Image.Image, size: int = THUMBNAIL) -> Image.Image:
    return thumbnail(picture, size)


def _image(audit: Audit, i: int) -> str:
    return _png(_thumb(Image.fromarray(audit.examples[i].pixels.squeeze()).convert("RGB")))


def _heat(audit: Audit, i: int, other: bool = False) -> str:
    example = audit.examples[i]
    return _png(_thumb(render(example.pixels, example.other if other else example.heatmap)))


def _grid_picture(grid: np.ndarray, region: np.ndarray | None = None) -> str:
    colours = colorize(grid, cmap="hot", symmetric=False)
    picture = Image.fromarray(colours).resize((THUMBNAIL, THUMBNAIL), Image.NEAREST)
    if region is not None:  # outline the region's cells
        pixels = np.asarray(picture).copy()
        cell = THUMBNAIL // grid.shape[0]
        for r, c in zip(*np.nonzero(region)):
            pixels[r * cell:(r + 1) * cell, c * cell, :] = (0, 200, 255)
            pixels[r * cell:(r + 1) * cell, (c + 1) * cell - 1, :] = (0, 200, 255)
            pixels[r * cell, c * cell:(c + 1) * cell, :] = (0, 200, 255)
            pixels[(r + 1) * cell - 1, c * cell:(c + 1) * cell, :] = (0, 200, 255)
        picture = Image.fromarray(pixels)
    return _png(picture)


def schema() -> dict:
    """report.json's JSON Schema: the shipped file, with the names of the registered checks (a
    new check is one class; the schema follows the registry)."""
    spec = json.loads(SCHEMA.read_text())
    spec["properties"]["findings"]["items"]["properties"]["check"]["enum"] = list(CHECKS)
    return spec


def payload(audit: Audit) -> dict:
    """report.json's content."""
    return {
        "schema_version": SCHEMA_VERSION,
        "verdict": audit.verdict,
        "based_on": audit.basis(),
        "findings": [f.to_dict() for f in audit.findings],
        "model": audit.identity,
        "images": len(audit.files),
        "classes": audit.classes,
        "checks": {name: audit.checks.get(name) for name in CHECKS if name in audit.checks},
        "not_run": dict(audit.not_run),
        "reach": None if "reach" not in audit.checks else {"median": audit.checks["reach"],
                                                           "taken": audit.checks["reach_taken"]},
        "deployed_kernels": audit.deployed,
        "thresholds": {name: {"threshold": check.threshold, "direction": check.direction, "summary": check.summary,
                              "informational": check.informational}
                       for name, check in CHECKS.items()},
        "per_class": [{"class": s.name, "images": len(s.images), "region_area": s.region_area,
                       "hans_score": s.hans_score, "eigengap": s.eigengap,
                       "clusters": [len(c) for c in s.clusters]} for s in audit.strategies],
        "randomisation": [{"step": label, "layers": n, "rank_correlation": corr}
                          for label, n, corr in (audit.randomisation.steps if audit.randomisation else [])],
        "random_logit": audit.random_logit,
        "drift": None if audit.drift is None else {
            "other": audit.drift.other, "agreement": audit.drift.agreement, "rank_correlation": audit.drift.correlation},
        "concepts": None if audit.concepts is None else audit.concepts.to_dict(),
        "per_image": audit.rows,
        "seconds": audit.seconds,
    }


def html(audit: Audit) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    index = {name: i for i, name in enumerate(audit.files)}
    have_images = audit.examples is not None

    def pictures(names):
        return [{"name": n, "image": _image(audit, index[n]), "heat": _heat(audit, index[n])}
                for n in names if have_images and n in index]

    findings = [{**f.to_dict(), "pictures": pictures(f.images[:shown.FINDING_PICTURES])} for f in audit.findings]
    classes = [{"name": s.name, "count": len(s.images), "area": s.region_area, "hans": s.hans_score,
                "eigengap": s.eigengap, "mean": _grid_picture(s.mean_map, s.region if s.region_area <= SMALL_REGION else None),
                "clusters": [{"size": len(c), "pictures": pictures([audit.files[i] for i in c[:shown.CLUSTER_PICTURES]])}
                             for c in s.clusters]} for s in audit.strategies]
    drift = None
    if audit.drift is not None and have_images:
        changed = audit.drift.most_changed(shown.DRIFT_PAIRS)
        drift = {"other": audit.drift.other, "agreement": audit.drift.agreement, "correlation": audit.drift.correlation,
                 "pairs": [{"name": audit.files[i], "image": _image(audit, i), "ours": _heat(audit, i),
                            "theirs": _heat(audit, i, other=True),
                            "correlation": audit.drift.per_image[i]["rank_correlation"],
                            "prediction": audit.rows[i]["prediction"],
                            "other": audit.drift.per_image[i]["other_prediction"]} for i in changed]}
    concepts = None
    if audit.concepts is not None:
        found = audit.concepts
        concepts = {"layer": found.layer, "channels": found.channels, "agreement": found.agreement,
                    "hans": {name: [c for c, _ in carried] for name, carried in found.hans.items()},
                    "classes": [{"name": entry.name, "images": entry.images, "concepts": [
                        {"channel": c, "share": share, "pictures": [
                            {"name": r.image, "picture": _png(_thumb(render(r.pixels, r.heat), CONCEPT_THUMBNAIL))}
                            for r in found.references.get(c, ())]} for c, share in entry.channels]}
                        for entry in found.per_class]}
    # the table shows the first ROWS_SHOWN rows, with a heatmap each (all rows are in images.csv)
    rows = [{**row, "picture": _heat(audit, i)} if have_images else row for i, row in enumerate(audit.rows[:shown.ROWS_SHOWN])]
    return env.get_template("report.html.j2").render(
        audit=audit, verdict=audit.verdict, findings=findings, facts=audit.identity, classes=classes,
        randomisation=audit.randomisation.steps if audit.randomisation else [], random_logit=audit.random_logit,
        drift=drift, concepts=concepts, rows=rows, checks=CHECKS, seconds=audit.seconds, based_on=audit.based_on,
        not_run=audit.not_run, deployed=audit.deployed, took=reach.TOOK, rows_shown=shown.ROWS_SHOWN)


def write(audit: Audit, folder: str | Path) -> dict[str, Path]:
    """report.html, report.json and images.csv into `folder`: all of them or, on failure, none."""
    folder = Path(folder)
    paths = {name: folder / name for name in FILES}
    data = payload(audit)
    page = html(audit)
    with Outputs() as outputs:
        outputs.write(paths["report.html"], lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
        outputs.write(paths["report.json"], lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1), encoding="utf-8"))
        outputs.write(paths["images.csv"], lambda tmp: _csv(audit.rows, tmp))
    return paths


def _csv(rows: list[dict], path: str) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns or ["image"])
        writer.writeheader()
        writer.writerows(rows)
