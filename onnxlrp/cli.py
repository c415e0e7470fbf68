"""The ``onnxlrp`` command: a thin layer over the Python API.

Every user error ends as one line ``error: ...`` on stderr and a non-zero exit, before
any output file is written (every input is checked first; each output is written
atomically, through a temporary file and a rename).
"""
from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional

import numpy as np
import typer
from matplotlib import colormaps
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .attribution import PRECISIONS, Explainer, OnnxLrpWarning, analyse
from .composites import PRESETS
from .errors import OnnxLrpError
from .evaluate import DEFAULT_METHODS, evaluate as run_evaluation, load_dataset, method_names, write as write_results
from .image import SIGNS, STYLES, render, save_npy, save_png
from .metrics import PROTOCOLS
from .model import first_line
from .preprocessing import PREPROCESSING, check_images, image_files
from .runtime import DEVICES
from .splitting import SPLITS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Layer-wise Relevance Propagation with Relevance Splitting for ResNet-family ONNX classifiers.",
)
console = Console()

Model = Annotated[Path, typer.Argument(help="ONNX classifier (.onnx).", show_default=False)]
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
SplitName = Literal[SPLITS]  # type: ignore[valid-type]
PreprocessName = Literal[tuple(PREPROCESSING)]  # type: ignore[valid-type]
DeviceName = Literal[DEVICES]  # type: ignore[valid-type]
PrecisionName = Literal[PRECISIONS]  # type: ignore[valid-type]
StyleName = Literal[STYLES]  # type: ignore[valid-type]
SignName = Literal[SIGNS]  # type: ignore[valid-type]
ProtocolName = Literal[PROTOCOLS + ("both",)]  # type: ignore[valid-type]

Preset = Annotated[PresetName, typer.Option("--preset", "-p", help="Rule preset.")]
SplitOpt = Annotated[
    Optional[SplitName],
    typer.Option("--split", "-s", help="Relevance Splitting at residual merges [default: preset's, ratio]."),
]
IncludeIdentity = Annotated[
    Optional[bool],
    typer.Option("--include-identity/--exclude-identity", help="Whether identity skips take part in the split [default: include]."),
]
Size = Annotated[Optional[int], typer.Option("--size", help="Input height and width where the model leaves them open [default: 224].")]


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            if issubclass(w.category, OnnxLrpWarning):
                typer.echo(f"warning: {w.message}", err=True)
    except OnnxLrpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if os.environ.get("ONNXLRP_DEBUG"):
            raise
        typer.echo(f"error: internal error ({type(exc).__name__}: {first_line(exc)}); set ONNXLRP_DEBUG=1 for the traceback", err=True)
        raise typer.Exit(2) from None


def _image_size(size: int | None) -> tuple[int, int] | None:
    return (size, size) if size else None


def _unique_names(stems: list[str]) -> list[str]:
    """The stems, numbered where two images of different folders share a name."""
    names, seen = [], set()
    for stem in stems:
        name, k = stem, 1
        while name in seen:
            name, k = f"{stem}_{k}", k + 1
        seen.add(name)
        names.append(name)
    return names


@app.command()
def explain(
    model: Model,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.", show_default=False)],
    preset: Preset = "epsilon-plus-flat",
    split: SplitOpt = None,
    include_identity: IncludeIdentity = None,
    bias: Annotated[bool, typer.Option("--bias/--no-bias", help="Keep biases in the rules (--no-bias: Zennit's zero_params=['bias']).")] = True,
    target: Annotated[Optional[int], typer.Option("--target", "-t", help="Class to explain [default: top-1 per image].")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Heatmap PNG (one image) or folder (several) [default: <image>_lrp.png, or lrp_out/].")] = None,
    npy: Annotated[Optional[Path], typer.Option("--npy", help="Also save the raw channel-summed map (float32 H x W) as .npy: a file (one image) or folder (several).")] = None,
    preprocess: Annotated[PreprocessName, typer.Option("--preprocess", help="Input normalisation the model expects.")] = "imagenet",
    device: Annotated[DeviceName, typer.Option("--device", help="onnxruntime execution provider.")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per onnxruntime run.")] = 16,
    size: Size = None,
    precision: Annotated[PrecisionName, typer.Option("--precision", help="Precision of the relevance pass (fp16: for GPUs; inputs and outputs stay float32).")] = "fp32",
    style: Annotated[StyleName, typer.Option("--style", help="signed: diverging colormap over the image; paper: quantized, normalised, jet at alpha 0.4.")] = "signed",
    heat_quantization: Annotated[Optional[int], typer.Option("--heat-quantization", min=0, help="Quantize the map to this many levels (0: off) [default: 8 for --style paper, else 0].")] = None,
    sign: Annotated[SignName, typer.Option("--sign", help="--style paper: which relevance to show.")] = "positive",
    cmap: Annotated[Optional[str], typer.Option("--cmap", help="Matplotlib colormap [default: coldnhot, or jet for --style paper].")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="Explain each image's k best classes (one heatmap each, <image>_top<r>_lrp.png).")] = None,
    low: Annotated[Optional[float], typer.Option(help="z^B lower box bound [default: pixel 0 after preprocessing].")] = None,
    high: Annotated[Optional[float], typer.Option(help="z^B upper box bound [default: pixel 255 after preprocessing].")] = None,
) -> None:
    """Explain images: write a heatmap PNG per image (relevance over the image)."""
    with _user_errors():
        files = image_files(images)
        ranks = top_k or 1
        several = len(files) * ranks > 1
        out_dir = (output or Path("lrp_out")) if several else None
        if several and output is not None and output.suffix.lower() == ".png":
            raise OnnxLrpError(f"{output}: {len(files) * ranks} heatmaps need an output folder, not a .png file")
        if top_k and target is not None:
            raise OnnxLrpError("--top-k and --target exclude each other")
        if cmap is not None and cmap not in colormaps:
            raise OnnxLrpError(f"unknown colormap '{cmap}'")
        check_images(files)  # every image opens and verifies before anything is built or written
        explainer = Explainer(
            model, preset=preset, split=split, include_identity=include_identity, bias=bias, low=low,
            high=high, device=device, preprocessing=preprocess, image_size=_image_size(size), precision=precision,
        )
        suffixes = [f"_top{r}_lrp" for r in range(1, ranks + 1)] if top_k else ["_lrp"]
        stems = _unique_names([f.stem + suffix for f in files for suffix in suffixes])
        pngs = [out_dir / f"{n}.png" for n in stems] if several else [output or Path(f"{stems[0]}.png")]
        arrays = [npy / f"{n}.npy" for n in stems] if (npy and several) else [npy]
        layout = explainer.summary.image.layout
        batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
        lines, writes = [], []
        # A pipeline: the next batch is decoded and the last one written while onnxruntime runs.
        with ThreadPoolExecutor(max_workers=4) as pool, \
                Progress(console=console, transient=True, disable=len(batches) <= 1) as progress:
            task = progress.add_task("explaining", total=len(files))
            upcoming = pool.submit(explainer.read_images, batches[0])
            done = 0
            for k in range(len(batches)):
                pixels = upcoming.result()
                if k + 1 < len(batches):
                    upcoming = pool.submit(explainer.read_images, batches[k + 1])
                result = explainer.explain(explainer.preprocessing.normalize(pixels, layout), target, batch_size, top_k)
                for row, heat in enumerate(result.heatmap()):
                    i = done * ranks + row
                    writes.append(pool.submit(_write, pixels[row // ranks], heat, pngs[i], arrays[i] if npy else None,
                                              style, heat_quantization, sign, cmap))
                    lines.append(f"{files[done + row // ranks]}: class {result.targets[row]}, initial relevance "
                                 f"{result.initial[row]:.4g}, input relevance {result.input_sum[row]:.4g} -> {pngs[i]}")
                done += len(pixels)
                progress.advance(task, len(pixels))
            for write in writes:
                write.result()
        for line in lines:
            console.print(line, highlight=False, soft_wrap=True)
        for note in explainer.summary.notes:
            typer.echo(f"note: {note}", err=True)


def _write(pixels, heat, png, npy_path, style, levels, sign, cmap) -> None:
    save_png(render(pixels, heat, style, levels, sign, cmap), png)
    if npy_path is not None:
        save_npy(heat.astype(np.float32), npy_path)


@app.command()
def graph(
    model: Model,
    preset: Preset = "epsilon-plus-flat",
    split: SplitOpt = None,
    include_identity: IncludeIdentity = None,
    size: Size = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the residual merges and the rule each node gets under a preset."""
    with _user_errors():
        analysis = analyse(model, preset, split, include_identity, _image_size(size))
        merges = analysis.merges
        kinds = {k: sum(m.kind == k for m in merges) for k in ("identity", "projection", "other")}
        if as_json:
            payload = {
                "model": str(model),
                "preset": analysis.preset.name,
                "split": analysis.split.method,
                "include_identity": analysis.split.include_identity,
                "input": {"name": analysis.image.name, "layout": analysis.image.layout,
                          "shape": list(analysis.image.shape(analysis.image.batch or 1, analysis.height, analysis.width))},
                "classes": analysis.num_classes,
                "merges": [m.to_dict() for m in merges],
                "merge_counts": kinds,
                "nodes": analysis.rule_table(),
                "notes": analysis.notes,
                "warnings": analysis.warnings,
            }
            typer.echo(json.dumps(payload, indent=2))
            return
        for note in analysis.notes:
            console.print(f"note: {note}", highlight=False)
        table = Table(title=f"{len(merges)} residual merges ({kinds['identity']} identity, "
                            f"{kinds['projection']} projection, {kinds['other']} other)")
        for column in ("merge node", "skip", "skip branch", "main branch"):
            table.add_column(column, overflow="fold")
        for m in merges:
            table.add_row(m.node, m.kind, "\n".join(m.skip_branch) or "-", f"{len(m.main_branch)} ops")
        console.print(table)
        rules = Table(title=f"rules under preset '{analysis.preset.name}': {analysis.preset.summary}")
        for column in ("node", "op", "", "rule"):
            rules.add_column(column, overflow="fold")
        for row in analysis.rule_table():
            rules.add_row(row["node"], row["op_type"], row["info"], row["rule"])
        console.print(rules)


def _list_methods(value: bool) -> None:
    """--list-methods runs before the arguments are checked, so it needs none."""
    if value:
        for name in method_names():
            typer.echo(name)
        raise typer.Exit()


@app.command()
def evaluate(
    model: Model,
    data: Annotated[Path, typer.Argument(help="Image folder: one subfolder per class (order: classes.txt, else by name), optional masks/.", show_default=False)],
    methods: Annotated[str, typer.Option("--methods", "-m", help="Comma-separated methods (see --list-methods).")] = ",".join(DEFAULT_METHODS),
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV of 'path,label' lines instead of class subfolders.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate the first N images only.")] = None,
    protocol: Annotated[ProtocolName, typer.Option("--protocol", help="Insertion/Deletion protocol: paper (>= thresholds), exact (tie-robust), or both.")] = "both",
    heat_quantization: Annotated[int, typer.Option("--heat-quantization", min=0, help="Quantize maps to this many levels before the metrics (0: off).")] = 8,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.md, results.json and conservation.png.")] = Path("evaluation"),
    preprocess: Annotated[PreprocessName, typer.Option("--preprocess", help="Input normalisation the model expects.")] = "imagenet",
    device: Annotated[DeviceName, typer.Option("--device", help="onnxruntime execution provider.")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 16,
    list_methods: Annotated[bool, typer.Option("--list-methods", is_eager=True, callback=_list_methods,
                                               help="List the methods and exit (no MODEL or DATA needed).")] = False,
) -> None:
    """Compare attribution methods on a labelled image folder: Insertion, Deletion, ID, ground-truth metrics."""
    with _user_errors():
        dataset = load_dataset(data, labels)
        total = min(limit or len(dataset.files), len(dataset.files))
        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        protocols = PROTOCOLS if protocol == "both" else (protocol,)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"evaluating {len(chosen)} methods", total=total)
            results = run_evaluation(model, dataset, chosen, protocols, heat_quantization, preprocess, limit,
                                     batch_size, device, progress=lambda n: progress.advance(task, n))
        paths = write_results(results, output)
        console.print(results.markdown(), highlight=False, soft_wrap=True)
        console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False, soft_wrap=True)


@app.command("compile")
def compile_model(
    model: Model,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the explainer (.onnx).", show_default=False)],
    preset: Preset = "epsilon-plus-flat",
    split: SplitOpt = None,
    include_identity: IncludeIdentity = None,
    bias: Annotated[bool, typer.Option("--bias/--no-bias", help="Keep biases in the rules.")] = True,
    preprocess: Annotated[PreprocessName, typer.Option("--preprocess", help="Preprocessing that defines the z^B box.")] = "imagenet",
    precision: Annotated[PrecisionName, typer.Option("--precision", help="Precision of the relevance pass.")] = "fp32",
    size: Size = None,
) -> None:
    """Save the explainer as an ONNX model (inputs images, target; outputs logits, relevance, ...)."""
    with _user_errors():
        explainer = Explainer(model, preset=preset, split=split, include_identity=include_identity, bias=bias,
                              preprocessing=preprocess, image_size=_image_size(size), precision=precision)
        explainer.save(output)
        console.print(f"wrote {output}: inputs images {list(explainer.input_shape)}, target [N]; "
                      "outputs logits, relevance, targets, initial_relevance"
                      + (", merge_relevance" if explainer.merges else ""), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    app()
