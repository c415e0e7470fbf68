"""The ``onnxlrp`` command: a thin layer over the Python API.

Every user error ends as one line ``error: ...`` on stderr, before any output file is
written: every input and every destination is checked first, and a command's outputs are
staged and published together (files.Outputs), so a failure leaves none.

Exit codes, the same in every command: 0 success (audit: pass); 1 bad input, or an audit
that fails; 2 a usage error (an unknown option, a bad value); 3 an internal error (a bug in
onnxlrp, with how to report it).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Annotated, Iterator, Literal, Optional

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.29 vendors click and does not re-export its exceptions
    from typer._click.core import ParameterSource
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - typer on the real click
    from click.core import ParameterSource
    from click.exceptions import ClickException, UsageError

from .analysis import analyse
from .audit.findings import CHECKS, DEFAULT_FAIL_ON, FailOn
from .audit.report import FILES as REPORT_FILES, write as write_report
from .audit.run import audit as run_audit, audit_dataset
from .errors import OnnxLrpError, OnnxLrpWarning, first_line
from .evaluation.evaluate import (DEFAULT_METHODS, RESULT_FILES, evaluate as run_evaluation, load_dataset, method_names,
                                  write as write_results)
from .evaluation.metrics import PROTOCOLS
from .explainer import Explainer
from .io.files import Outputs, check_writable
from .io.image import SIGNS, STYLES, is_colormap, write_heatmap
from .io.preprocessing import PREPROCESSING, check_images, image_sources
from .lrp import explosion as explode
from .lrp import reach
from .lrp import rules as rules_module
from .lrp.composites import PRESETS
from .lrp.heatmaps import KINDS
from .lrp.splitting import SPLITS
from .options import PRECISIONS
from .runtime.cluster import Cluster, batches_of, import_ray, quiet
from .runtime.session import DEVICES, quiet as quiet_onnxruntime


#: exit codes (module docstring); the audit's verdict "fail" is 1, as bad input is
BAD_INPUT, USAGE, INTERNAL = 1, 2, 3
AUDIT_FAIL, AUDIT_ERROR = 1, BAD_INPUT


class _OneLineUsageError(ClickException):
    exit_code = USAGE

    def show(self, file=None) -> None:
        typer.echo(f"error: {self.format_message()}", err=True)


def _one_line(exc: UsageError) -> ClickException:
    if type(exc).__name__ == "NoArgsIsHelpError":  # `onnxlrp explain` alone: the help, as asked
        return exc
    command = exc.ctx.command_path if exc.ctx is not None else "onnxlrp"
    return _OneLineUsageError(f"{exc.format_message()} (see {command} --help)")


class _Commands(TyperGroup):
    """Usage errors (an unknown option or value, a missing argument) are one line, like every
    other error of the command, and exit 2."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise _one_line(exc) from None


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Layer-wise Relevance Propagation with Relevance Splitting for ResNet-family ONNX classifiers.",
)
console = Console()


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"onnxlrp {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                                help="Print onnxlrp's version and exit.")] = False) -> None:
    """Layer-wise Relevance Propagation with Relevance Splitting for ResNet-family ONNX classifiers."""


def _parse_size(value: str | None) -> tuple[int, int] | None:
    """--size N (square) or HxW (a text-line classifier's 48x192)."""
    if value is None:
        return None
    parts = value.lower().split("x")
    try:
        height, width = (int(parts[0]),) * 2 if len(parts) == 1 else map(int, parts)
    except ValueError:
        raise typer.BadParameter(f"'{value}' is not N or HxW (e.g. 224 or 48x192)") from None
    if height < 1 or width < 1:
        raise typer.BadParameter(f"'{value}': height and width must be at least 1")
    return height, width


Model = Annotated[Path, typer.Argument(help="ONNX classifier (.onnx).", show_default=False, metavar="MODEL")]
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
SplitName = Literal[SPLITS]  # type: ignore[valid-type]
PreprocessName = Literal[tuple(PREPROCESSING)]  # type: ignore[valid-type]
DeviceName = Literal[DEVICES]  # type: ignore[valid-type]
PrecisionName = Literal[PRECISIONS]  # type: ignore[valid-type]
StyleName = Literal[STYLES]  # type: ignore[valid-type]
SignName = Literal[SIGNS]  # type: ignore[valid-type]
ProtocolName = Literal[PROTOCOLS + ("both",)]  # type: ignore[valid-type]

Preset = Annotated[PresetName, typer.Option("--preset", "-p", metavar="PRESET",
                                            help=f"Rule preset: {', '.join(PRESETS)}.")]
SplitOpt = Annotated[
    Optional[SplitName],
    typer.Option("--split", "-s", help="Relevance Splitting at residual merges.", show_default="the preset's, ratio"),
]
IncludeIdentity = Annotated[
    Optional[bool],
    typer.Option("--include-identity/--exclude-identity", show_default="include",
                 help="Whether identity skips take part in the split."),
]
Size = Annotated[Optional[str], typer.Option("--size", metavar="N|HxW", callback=_parse_size,
                                             help="Input height and width where the model leaves them open: N, or HxW.",
                                             show_default="224")]
Preprocess = Annotated[PreprocessName, typer.Option("--preprocess", metavar="NAME",
                                                    help=f"Input normalisation: {', '.join(PREPROCESSING)}.")]
HeatmapName = Literal[KINDS]  # type: ignore[valid-type]
HeatmapOpt = Annotated[HeatmapName, typer.Option("--heatmap", help="pixel: the input relevance; layer: Relevance-CAM at --layer; gated: pixel relevance gated by the positive layer relevance (neither conserves).")]
LayerOpt = Annotated[str, typer.Option("--layer", metavar="NAME", help="Where --heatmap layer/gated look: 'last' (the last conv block), 'input', or a node (onnxlrp graph lists them) or tensor name.")]
RuleOpt = Annotated[Optional[list[str]], typer.Option(
    "--rule", metavar="KEY=RULE(ARGS)",
    help="Override the preset's rule for a node (by name, as `onnxlrp graph` lists them) or an op type; "
         "repeatable: Conv=epsilon(0.25), /layer4/layer4.0/conv1/Conv=gamma(gamma=0.1), Conv=zplus(fallback=flat). "
         "Rules: epsilon, norm, zplus, alpha_beta, gamma, flat, w2, zbox, avg2x2, pass, gradient, guided, gate.")]
RayFlag = Annotated[bool, typer.Option("--ray", help="Run on a local Ray instance (pip install 'onnxlrp[ray]').")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", metavar="ADDRESS", help="Run on this Ray cluster ('auto': the one `ray start` runs here); implies --ray.")]
Concurrency = Annotated[int, typer.Option("--concurrency", min=1, help="With --ray: actors, one onnxruntime session each.")]
#: progress bars go to stderr, so that stdout holds only results
progress_console = Console(stderr=True)


@contextmanager
def _user_errors(code: int = BAD_INPUT) -> Iterator[None]:
    """Bad input -> its one line and exit `code`; anything else -> an internal error, exit 3.
    onnxlrp's warnings are printed whichever way the command ends, before the error."""
    if not os.environ.get("ONNXLRP_DEBUG"):
        quiet_onnxruntime()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for w in caught:
                    if issubclass(w.category, OnnxLrpWarning):
                        typer.echo(f"warning: {w.message}", err=True)
    except OnnxLrpError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code) from None
    except (typer.Exit, typer.Abort, UsageError):  # a usage error: _Commands makes it one line, exit 2
        raise
    except Exception as exc:
        if os.environ.get("ONNXLRP_DEBUG"):
            raise
        typer.echo(f"error: internal error ({type(exc).__name__}: {first_line(exc)}); this is a bug in onnxlrp: "
                   "please report it with the traceback that ONNXLRP_DEBUG=1 prints", err=True)
        raise typer.Exit(INTERNAL) from None


def _rules(specs: list[str] | None) -> dict | None:
    """--rule KEY=RULE(ARGS), repeated -> the rule overrides (None: none); a bad spec is a usage error."""
    if not specs:
        return None
    try:
        return dict(rules_module.parse(spec) for spec in specs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--rule'") from None


def _image_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    return tuple(size) if size else None


def _unique(names: list[str]) -> list[str]:
    """The names, numbered where two images from different arguments would share one."""
    result, seen = [], set()
    for stem in names:
        name, k = stem, 1
        while name in seen:
            name, k = f"{stem}_{k}", k + 1
        seen.add(name)
        result.append(name)
    return result


def _destinations(sources: list[tuple[Path, PurePosixPath]], suffixes: list[str], output: Path | None,
                  npy: Path | None) -> list[tuple[Path | None, Path | None]]:
    """(PNG, NPY) per image and rank. One heatmap: -o is the PNG (or a folder to put it in),
    default ./<image>_lrp.png; several: -o is a folder, default ./lrp_out/, mirroring the
    images' subfolders. --npy alone writes only the .npy files."""
    several = len(sources) * len(suffixes) > 1
    names = _unique([str(rel.parent / f"{rel.stem}{suffix}") for _, rel in sources for suffix in suffixes])
    png_dir = output if several else (output if output is not None and output.is_dir() else None)
    if several and output is None and npy is None:
        png_dir = Path("lrp_out")
    npy_dir = npy if several or (npy is not None and npy.is_dir()) else None
    result = []
    for name in names:
        if png_dir is not None:
            png = png_dir / f"{name}.png"
        elif output is not None:
            png = output
        else:
            png = None if npy is not None else Path(f"{Path(name).name}.png")
        array = npy_dir / f"{name}.npy" if npy_dir is not None else npy
        result.append((png, array))
    return result


#: explain's options that only shape the PNG files, which --parquet does not write
_PICTURE_OPTIONS = ("style", "heat_quantization", "sign", "cmap", "top_k")


@app.command()
def explain(
    ctx: typer.Context,
    model: Model,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images (subfolders too).",
                                                 show_default=False, metavar="IMAGES...")],
    preset: Preset = "epsilon-plus-flat",
    split: SplitOpt = None,
    include_identity: IncludeIdentity = None,
    bias: Annotated[bool, typer.Option("--bias/--no-bias", help="Keep biases in the rules (--no-bias: Zennit's zero_params=['bias']).")] = True,
    target: Annotated[Optional[int], typer.Option("--target", "-t", help="Class to explain.", show_default="top-1 per image")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Heatmap PNG for one image; a folder for several (subfolders mirrored).",
                                                   show_default="./<image>_lrp.png; several: ./lrp_out/")] = None,
    npy: Annotated[Optional[Path], typer.Option("--npy", help="Save the raw channel-summed map (float32 H x W) as .npy: a file for one image, a folder for several. Alone (no -o), no PNG is written.")] = None,
    preprocess: Preprocess = "imagenet",
    device: Annotated[DeviceName, typer.Option("--device", help="onnxruntime execution provider.")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per onnxruntime run.")] = 16,
    size: Size = None,
    precision: Annotated[PrecisionName, typer.Option("--precision", help="Precision of the relevance pass (fp16: for GPUs; inputs and outputs stay float32).")] = "fp32",
    style: Annotated[StyleName, typer.Option("--style", help="signed: diverging colormap over the image; paper: quantized, normalised, jet at alpha 0.4.")] = "signed",
    heat_quantization: Annotated[Optional[int], typer.Option("--heat-quantization", min=0, metavar="LEVELS", help="Quantize the map to this many levels (0: off).", show_default="8 for --style paper, else 0")] = None,
    sign: Annotated[SignName, typer.Option("--sign", help="--style paper: which relevance to show.")] = "positive",
    cmap: Annotated[Optional[str], typer.Option("--cmap", help="Matplotlib colormap.", show_default="coldnhot; jet for --style paper")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, metavar="K", help="Explain each image's K best classes (<image>_top<r>_lrp.png).")] = None,
    low: Annotated[Optional[float], typer.Option(help="z^B lower box bound.", show_default="pixel 0 after preprocessing")] = None,
    high: Annotated[Optional[float], typer.Option(help="z^B upper box bound.", show_default="pixel 255 after preprocessing")] = None,
    heatmap: HeatmapOpt = "pixel",
    layer: LayerOpt = "last",
    rule: RuleOpt = None,
    parquet: Annotated[Optional[Path], typer.Option("--parquet", metavar="DIR", help="On Ray: a folder of Parquet rows (path, target, logits, relevance totals, float16 heatmap) instead of PNG/NPY; a rerun resumes.")] = None,
    ray: RayFlag = False,
    ray_address: RayAddress = None,
    concurrency: Concurrency = 1,
) -> None:
    """Explain images: a heatmap PNG per image (relevance over the image)."""
    if parquet is not None:
        given = [name for name in _PICTURE_OPTIONS
                 if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]
        _explain_to_parquet(model, images, parquet, output, npy, given, dict(
            preset=preset, split=split, include_identity=include_identity, bias=bias, low=low, high=high,
            precision=precision, preprocessing=preprocess, image_size=_image_size(size), heatmap=heatmap,
            layer=layer, target=target, batch_size=batch_size, device=device, rules=_rules(rule)), ray, ray_address,
            concurrency)
        return
    with _user_errors():
        cluster = _cluster(ray, ray_address, concurrency)
        sources = image_sources(images)
        files = [path for path, _ in sources]
        ranks = top_k or 1
        several = len(files) * ranks > 1
        if top_k and target is not None:
            raise OnnxLrpError("--top-k and --target exclude each other")
        for option, path, suffix in (("--output", output, ".png"), ("--npy", npy, ".npy")):
            if several and path is not None and path.suffix.lower() == suffix:
                raise OnnxLrpError(f"{path}: {len(files) * ranks} heatmaps need an output folder for {option}, not a {suffix} file")
        if cmap is not None and not is_colormap(cmap):
            raise OnnxLrpError(f"unknown colormap '{cmap}'")
        suffixes = [f"_top{r}_lrp" for r in range(1, ranks + 1)] if top_k else ["_lrp"]
        destinations = _destinations(sources, suffixes, output, npy)
        if output is not None and npy is not None and output.resolve() == npy.resolve() and not several:
            raise OnnxLrpError(f"{output}: --output and --npy name the same file")
        # Every destination and every image is checked before anything is built or written.
        check_writable(p for pair in destinations for p in pair if p is not None)
        check_images(files)
        explainer = Explainer(
            model, preset=preset, split=split, include_identity=include_identity, bias=bias, low=low,
            high=high, device=device, preprocessing=preprocess, image_size=_image_size(size), precision=precision,
            heatmap=heatmap, layer=layer, rules=_rules(rule),
        )
        explainer.targets(target, 1)  # a bad --target or --top-k is an error before anything is said or run
        if top_k and top_k > explainer.num_classes:
            raise OnnxLrpError(f"--top-k {top_k}: the model has {explainer.num_classes} classes")
        for note in explainer.summary.notes:  # before the results: they say what was explained
            typer.echo(f"note: {note}", err=True)
        if cluster is not None:
            per_image = [(str(f), destinations[i * ranks:(i + 1) * ranks]) for i, f in enumerate(files)]
            _explain_on_ray(explainer, per_image, cluster, device, batch_size, target, top_k, style,
                            heat_quantization, sign, cmap)
            return
        layout = explainer.summary.image.layout
        batches = batches_of(files, batch_size)  # as explain --ray cuts them
        lines, writes, explosion, reached = [], [], None, []
        # A pipeline: the next batch is decoded and the last one written while onnxruntime runs.
        # Outputs are staged and appear together at the end: a failure leaves none behind.
        with Outputs() as outputs, ThreadPoolExecutor(max_workers=4) as pool, \
                _progress(disable=len(batches) <= 1) as progress:
            task = progress.add_task("explaining", total=len(files))
            upcoming = pool.submit(explainer.read_images, batches[0])
            done = 0
            for k in range(len(batches)):
                pixels = upcoming.result()
                if k + 1 < len(batches):
                    upcoming = pool.submit(explainer.read_images, batches[k + 1])
                result = explainer.explain(explainer.preprocessing.normalize(pixels, layout), target, batch_size, top_k,
                                           warn=False)
                explosion = result.explosion if explosion is None else explosion + result.explosion
                # per batch, once: each of these sums the whole relevance
                sums, at_input, taken = result.input_sum, result.reach, result.taken_shares
                if taken is not None:  # LRP, not gradients
                    reached.append((at_input, taken))
                for row, heat in enumerate(result.heatmap()):
                    i = done * ranks + row
                    png, array = destinations[i]
                    writes.append(pool.submit(write_heatmap, outputs, pixels[row // ranks], heat, png, array,
                                              style, heat_quantization, sign, cmap))
                    written = ", ".join(str(p) for p in (png, array) if p is not None)
                    lines.append(f"{files[done + row // ranks]}: class {result.targets[row]}, initial relevance "
                                 f"{result.initial[row]:.4g}, input relevance {sums[row]:.4g}"
                                 f"{_reached(at_input, taken, row)} -> {written}")
                done += len(pixels)
                progress.advance(task, len(pixels))
            for write in writes:
                write.result()
        for line in lines:
            console.print(line, highlight=False, soft_wrap=True)
        if explosion is not None and explosion.images:
            typer.echo(f"warning: {explode.message(explosion, preset, bias)}", err=True)
        if reached:
            _warn_reach(np.concatenate([a for a, _ in reached]), np.concatenate([t for _, t in reached]), preset, bias)


def _reached(at_input: np.ndarray, taken: np.ndarray | None, row: int) -> str:
    """' (72.4% reached the input; biases and stabilisers took 27.6%)' for LRP, '' for gradients
    (taken None)."""
    return f" ({reach.describe(float(at_input[row]), taken[row])})" if taken is not None else ""


def _warn_reach(at_input: np.ndarray, taken: np.ndarray, preset: str, bias: bool) -> None:
    """One warning line when the median share of the explained logit at the input is below 10 %
    (at_input [N], taken [N, F]: lrp.reach.shares)."""
    subject = f"preset {preset}" + ("" if bias else " without biases")
    line = reach.warning(at_input, taken, subject, reach.advice(bias, taken, preset))
    if line:
        typer.echo(f"warning: {line}", err=True)


def _progress(disable: bool = False) -> Progress:
    """A bar with the time left, on stderr, only where a person watches a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                    console=progress_console, transient=True, disable=disable or not progress_console.is_terminal)


def _cluster(ray: bool, address: str | None, concurrency: int) -> Cluster | None:
    """--ray / --ray-address: where to run; None: in this process. Asking for Ray without the
    extra installed is an error here, before anything is built."""
    if not (ray or address):
        return None
    import_ray()
    quiet()
    return Cluster(address, concurrency)


def _explain_on_ray(explainer, per_image, cluster, device, batch_size, target, top_k, style, levels, sign,
                    cmap) -> None:
    """explain --ray: the same files as in one process, written by Ray actors batch by batch;
    a rerun skips the images whose files all exist (an interrupted run resumes)."""
    from .distributed import explain_files

    todo = [(f, pairs) for f, pairs in per_image if not all(p.exists() for pair in pairs for p in pair if p)]
    if len(todo) < len(per_image):
        typer.echo(f"note: {len(per_image) - len(todo)} image(s) already explained there: skipped", err=True)
    with _progress(disable=not todo) as progress:
        task = progress.add_task(f"explaining on Ray ({cluster.concurrency} actor(s))", total=len(todo))
        rows, explosion = explain_files(explainer, todo, cluster, device=device, batch_size=batch_size,
                                        target=target, top_k=top_k, style=style, levels=levels, sign=sign,
                                        cmap=cmap, progress=lambda n: progress.advance(task, n))
    for row, (_, pairs) in zip(rows, todo):
        for rank, (png, array) in enumerate(pairs):
            written = ", ".join(str(p) for p in (png, array) if p is not None)
            taken = np.asarray(row["taken"]) if row["taken"] is not None else None
            console.print(f"{row['file']}: class {row['targets'][rank]}, initial relevance {row['initial'][rank]:.4g}, "
                          f"input relevance {row['input_sum'][rank]:.4g}{_reached(row['reach'], taken, rank)} "
                          f"-> {written}", highlight=False, soft_wrap=True)
    if explosion is not None and explosion.images:
        typer.echo(f"warning: {explode.message(explosion, explainer.summary.preset, explainer.bias)}", err=True)
    lrp = [row for row in rows if row["taken"] is not None]
    if lrp:
        _warn_reach(np.array([s for row in lrp for s in row["reach"]]), np.array([t for row in lrp for t in row["taken"]]),
                    explainer.summary.preset, explainer.bias)


def _explain_to_parquet(model, images, parquet, output, npy, pictures: list[str], options: dict, ray, ray_address,
                        concurrency) -> None:
    """explain --parquet DIR: onnxlrp.distributed.explain_dataset (Parquet rows, resumable), with
    every explainer option of the command; those it cannot honour are refused."""
    from .distributed import done_paths, explain_dataset

    with _user_errors():
        if output is not None or npy is not None:
            raise OnnxLrpError("--parquet writes Parquet rows only: leave out -o and --npy")
        if pictures:
            flags = ", ".join("--" + name.replace("_", "-") for name in pictures)
            raise OnnxLrpError(f"--parquet writes one row per image and no pictures: leave out {flags}")
        cluster = _cluster(ray, ray_address, concurrency) or Cluster()
        explain_dataset([str(p) for p in images], model, output=parquet, concurrency=cluster.concurrency,
                        address=cluster.address, **options)
        console.print(f"wrote {parquet}: {len(done_paths(parquet))} image(s) explained (Parquet)", highlight=False,
                      soft_wrap=True)


@app.command()
def graph(
    model: Model,
    preset: Preset = "epsilon-plus-flat",
    split: SplitOpt = None,
    include_identity: IncludeIdentity = None,
    size: Size = None,
    rule: RuleOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the residual merges and the rule each node gets under a preset."""
    with _user_errors():
        analysis = analyse(model, preset, split, include_identity, _image_size(size), _rules(rule))
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
            typer.echo(f"note: {note}", err=True)
        width = max(16, console.width // 3)  # node names get a third of the terminal
        console.print(f"{len(merges)} residual merges ({kinds['identity']} identity, {kinds['projection']} "
                      f"projection, {kinds['other']} other)", highlight=False)
        table = Table(box=box.SIMPLE_HEAD)
        table.add_column("merge node", overflow="fold", min_width=_fitting([m.node for m in merges], width))
        table.add_column("skip", overflow="fold")
        table.add_column("skip branch", overflow="fold",
                         min_width=_fitting([n for m in merges for n in m.skip_branch], width))
        table.add_column("main", overflow="fold")
        for m in merges:
            kind = f"{m.kind} ({m.detail})" if m.detail else m.kind
            table.add_row(_breakable(m.node, width), kind, "\n".join(_breakable(n, width) for n in m.skip_branch) or "-",
                          f"{len(m.main_branch)} ops")
        console.print(table)
        console.print(f"rules under preset '{analysis.preset.name}': {analysis.preset.summary}", highlight=False)
        rules = Table(box=box.SIMPLE_HEAD)
        rows = analysis.rule_table()
        rules.add_column("node", overflow="fold", min_width=_fitting([row["node"] for row in rows], width))
        rules.add_column("op", overflow="fold")
        rules.add_column("rule", overflow="fold")
        for row in rows:
            rules.add_row(_breakable(row["node"], width), f"{row['op_type']} {row['info']}".strip(), row["rule"])
        console.print(rules)


def _breakable(name: str, width: int) -> str:
    """A node name broken into lines before its '/' separators, each at most `width` wide where
    the parts allow: a table then wraps names where they divide, not mid-word."""
    lines = [""]
    for part in filter(None, re.split(r"(?=/)", name)):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append(part)
        else:
            lines[-1] += part
    return "\n".join(lines)


def _fitting(names: list[str], width: int) -> int:
    """The column width the broken names need (at most `width` where the parts allow)."""
    return max((len(line) for name in names for line in _breakable(name, width).splitlines()), default=0)


def _fail_on(value: list[str] | None) -> FailOn:
    """--fail-on's checks and thresholds; an unknown check is a usage error (exit 2)."""
    try:
        return FailOn.parse(value)
    except OnnxLrpError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--fail-on: ")) from None


def _list_methods(value: bool) -> None:
    """--list-methods runs before the arguments are checked, so it needs none."""
    if value:
        for name in method_names():
            typer.echo(name)
        raise typer.Exit()


@app.command()
def evaluate(
    model: Model,
    data: Annotated[Path, typer.Argument(help="Image folder: one subfolder per class (order: classes.txt, else by name), optional masks/.", show_default=False, metavar="DATA")],
    methods: Annotated[str, typer.Option("--methods", "-m", help="Comma-separated methods (see --list-methods); also any preset by name, and NAME:layer or NAME:gated for an LRP method's Relevance-CAM or gated map.")] = ",".join(DEFAULT_METHODS),
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV of 'path,label' lines instead of class subfolders.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate the first N images only.")] = None,
    protocol: Annotated[ProtocolName, typer.Option("--protocol", help="Insertion/Deletion protocol: paper (>= thresholds), exact (tie-robust), or both.")] = "both",
    heat_quantization: Annotated[int, typer.Option("--heat-quantization", min=0, help="Quantize maps to this many levels before the metrics (0: off).")] = 8,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.md, results.json and conservation.png.")] = Path("evaluation"),
    preprocess: Preprocess = "imagenet",
    device: Annotated[DeviceName, typer.Option("--device", help="onnxruntime execution provider.")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 16,
    size: Size = None,
    list_methods: Annotated[bool, typer.Option("--list-methods", is_eager=True, callback=_list_methods,
                                               help="List the methods and exit (no MODEL or DATA needed).")] = False,
    ray: RayFlag = False,
    ray_address: RayAddress = None,
    concurrency: Concurrency = 1,
) -> None:
    """Compare attribution methods on a labelled image folder: Insertion, Deletion, ID, ground-truth metrics."""
    with _user_errors():
        dataset = load_dataset(data, labels)
        total = min(limit or len(dataset.files), len(dataset.files))
        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        if not chosen:
            raise OnnxLrpError("--methods names no method (see --list-methods)")
        protocols = PROTOCOLS if protocol == "both" else (protocol,)
        check_writable(output / name for name in RESULT_FILES)  # before the run, not after it
        cluster = _cluster(ray, ray_address, concurrency)
        with _progress() as progress:
            task = progress.add_task(f"evaluating {len(chosen)} methods", total=total)
            results = run_evaluation(model, dataset, chosen, protocols, heat_quantization, preprocess, limit,
                                     batch_size, device, progress=lambda n: progress.advance(task, n),
                                     cluster=cluster, image_size=_image_size(size))
        paths = write_results(results, output)
        console.print(results.markdown(), highlight=False, soft_wrap=True)
        for line in results.reach_warnings():
            typer.echo(f"warning: {line}", err=True)
        console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False, soft_wrap=True)


@app.command()
def audit(
    model: Model,
    data: Annotated[Path, typer.Argument(help="Image folder: one subfolder per class (order: classes.txt, else by name), optional masks/; or flat with --labels; or flat without labels (a production sample: audited on the predicted classes).", show_default=False, metavar="DATA")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.html, report.json and images.csv.")] = Path("audit"),
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV of 'path,label' lines instead of class subfolders.")] = None,
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Folder of object masks mirroring DATA (default: DATA/masks).")] = None,
    against: Annotated[Optional[Path], typer.Option("--against", help="Another model file to compare with (the previous release, the float source of an int8 model).")] = None,
    preset: Preset = "epsilon-plus-flat",
    split: SplitOpt = None,
    include_identity: IncludeIdentity = None,
    bias: Annotated[bool, typer.Option("--bias/--no-bias", help="Keep biases in the rules (--no-bias: Zennit's zero_params=['bias']).")] = True,
    low: Annotated[Optional[float], typer.Option(help="z^B lower box bound.", show_default="pixel 0 after preprocessing")] = None,
    high: Annotated[Optional[float], typer.Option(help="z^B upper box bound.", show_default="pixel 255 after preprocessing")] = None,
    precision: Annotated[PrecisionName, typer.Option("--precision", help="Precision of the relevance pass (fp16: for GPUs).")] = "fp32",
    heatmap: HeatmapOpt = "pixel",
    layer: LayerOpt = "last",
    rule: RuleOpt = None,
    fail_on: Annotated[Optional[list[str]], typer.Option("--fail-on", metavar="CHECK[=THRESHOLD]",
                                                         help="Checks that fail the audit (repeat or comma-separate; 'none' for none). "
                                                              f"Default: {','.join(DEFAULT_FAIL_ON)}. Checks: "
                                                              f"{', '.join(n for n, c in CHECKS.items() if not c.informational)}.")] = None,
    faithfulness: Annotated[bool, typer.Option("--faithfulness", help="Also Insertion/Deletion per image (tie-robust protocol; slower).")] = False,
    sanity_images: Annotated[int, typer.Option("--sanity-images", min=0, help="Images for the randomisation and random-logit tests (0: skip them).")] = 16,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Audit the first N images only.")] = None,
    preprocess: Preprocess = "imagenet",
    size: Size = None,
    device: Annotated[DeviceName, typer.Option("--device", help="onnxruntime execution provider.")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 16,
    ray: RayFlag = False,
    ray_address: RayAddress = None,
    concurrency: Concurrency = 1,
) -> None:
    """Audit a deployed model on a folder of images: a report to read and a verdict to gate on.

    Exit code 0: pass; 1: a finding breaks a --fail-on threshold, or bad input; 2: a usage error."""
    with _user_errors(AUDIT_ERROR):
        rules = _fail_on(fail_on)
        dataset = audit_dataset(data, labels, masks)
        total = min(limit or len(dataset.files), len(dataset.files))
        check_writable(output / name for name in REPORT_FILES)  # before the run, not after it
        cluster = _cluster(ray, ray_address, concurrency)
        with _progress() as progress:
            task = progress.add_task(f"auditing {total} images", total=total + 1)
            result = run_audit(model, data, labels=labels, masks=masks, against=against, preset=preset, split=split,
                               include_identity=include_identity, bias=bias, low=low, high=high, precision=precision,
                               rules=_rules(rule),
                               preprocessing=preprocess, image_size=_image_size(size), heatmap=heatmap,
                               layer=layer, fail_on=rules,
                               faithfulness=faithfulness, sanity_images=sanity_images, limit=limit,
                               batch_size=batch_size, device=device, progress=lambda n: progress.advance(task, n),
                               cluster=cluster)
        paths = write_report(result, output)
        console.print(f"verdict: {result.verdict.upper()} ({len(result.findings)} finding(s), "
                      f"{sum(f.severity == 'fail' for f in result.findings)} failing), on {result.based_on}",
                      highlight=False, soft_wrap=True)
        for check, why in result.not_run.items():
            console.print(f"  not run: {check}: {why}", highlight=False, soft_wrap=True)
        for f in result.findings:
            where = f" [{f.class_}]" if f.class_ else ""
            console.print(f"  {f.severity}: {f.check}{where}: {f.message}", highlight=False, soft_wrap=True)
        console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False, soft_wrap=True)
    if result.verdict == "fail":
        raise typer.Exit(AUDIT_FAIL)


@app.command("compile")
def compile_model(
    model: Model,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the explainer (.onnx).", show_default=False)],
    preset: Preset = "epsilon-plus-flat",
    split: SplitOpt = None,
    include_identity: IncludeIdentity = None,
    bias: Annotated[bool, typer.Option("--bias/--no-bias", help="Keep biases in the rules.")] = True,
    preprocess: Preprocess = "imagenet",
    precision: Annotated[PrecisionName, typer.Option("--precision", help="Precision of the relevance pass.")] = "fp32",
    size: Size = None,
    low: Annotated[Optional[float], typer.Option(help="z^B lower box bound.", show_default="pixel 0 after preprocessing")] = None,
    high: Annotated[Optional[float], typer.Option(help="z^B upper box bound.", show_default="pixel 255 after preprocessing")] = None,
    heatmap: HeatmapOpt = "pixel",
    layer: LayerOpt = "last",
    rule: RuleOpt = None,
) -> None:
    """Save the explainer as an ONNX model (inputs images, target; outputs logits, relevance, ...)."""
    with _user_errors():
        check_writable([output])
        explainer = Explainer(model, preset=preset, split=split, include_identity=include_identity, bias=bias,
                              low=low, high=high, preprocessing=preprocess, image_size=_image_size(size),
                              precision=precision, heatmap=heatmap, layer=layer, rules=_rules(rule))
        for note in explainer.summary.notes:
            typer.echo(f"note: {note}", err=True)
        explainer.save(output)
        shape = ["N" if explainer.summary.image.batch is None else explainer.summary.image.batch,
                 *explainer.input_shape[1:]]
        console.print(f"wrote {output}: inputs images [{', '.join(map(str, shape))}], target [N]; "
                      "outputs logits, relevance, targets, initial_relevance"
                      + (", merge_relevance" if explainer.merges else "")
                      + (f", heatmap [N, {explainer.summary.height}, {explainer.summary.width}] ({heatmap})"
                         if heatmap != "pixel" else ""), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    app()
