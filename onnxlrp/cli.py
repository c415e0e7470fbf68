"""The ``onnxlrp`` command: a thin layer over the Python API.

Every user error ends as one line ``error: ...`` on stderr, before any output file is
written: every input and every destination is checked first, and a command's outputs are
staged and published together (files.Outputs), so a failure leaves none (explain --ray
publishes each image's files as its batch ends, and a rerun resumes).

Exit codes, the same in every command: 0 success (audit: pass); 1 bad input, or an audit
that fails; 2 a usage error (an unknown option, a bad value); 3 an internal error (a bug in
onnxlrp, with how to report it).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
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
from .cli_options import EXPLAINING, HEATMAP, MODEL, RULES, GroupedCommand, Settings, takes
from .errors import OnnxLrpError, OnnxLrpWarning, OutputError, SettingError, first_line
from .evaluation.baselines import fixed_settings
from .evaluation.evaluate import (DEFAULT_METHODS, RESULT_FILES, evaluate as run_evaluation, load_dataset, method_names,
                                  write as write_results)
from .evaluation.metrics import PROTOCOLS
from .explainer import Explainer
from .io.files import check_writable
from .io.image import SIGNS, STYLES, is_colormap
from .lrp import explosion as explode
from .lrp import reach
from .options import Runtime
from .runs import FileSink, ImageFiles, explain_folder
from .runtime.cluster import Cluster
from .runtime.session import quiet as quiet_onnxruntime


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
console = Console(markup=False)  # file and class names are text: "[star]" is no style


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"onnxlrp {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                                help="Print onnxlrp's version and exit.")] = False) -> None:
    """Layer-wise Relevance Propagation with Relevance Splitting for ResNet-family ONNX classifiers."""


Model = Annotated[Path, typer.Argument(help="ONNX classifier (.onnx).", show_default=False, metavar="MODEL")]
StyleName = Literal[STYLES]  # type: ignore[valid-type]
SignName = Literal[SIGNS]  # type: ignore[valid-type]
ProtocolName = Literal[PROTOCOLS + ("both",)]  # type: ignore[valid-type]
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


#: explain's options that only shape the PNG files, which --parquet does not write
_PICTURE_OPTIONS = ("style", "heat_quantization", "sign", "cmap", "top_k", "concepts")


@app.command(cls=GroupedCommand)
@takes(*EXPLAINING)
def explain(
    ctx: typer.Context,
    model: Model,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images (subfolders too).",
                                                 show_default=False, metavar="IMAGES...")],
    target: Annotated[Optional[int], typer.Option("--target", "-t", help="Class to explain.", show_default="top-1 per image")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, metavar="K", help="Explain each image's K best classes (<image>_top<r>_lrp.png).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Heatmap PNG for one image; a folder for several (subfolders mirrored).",
                                                   show_default="./<image>_lrp.png; several: ./lrp_out/")] = None,
    npy: Annotated[Optional[Path], typer.Option("--npy", help="Save the raw channel-summed map (float32 H x W) as .npy: a file for one image, a folder for several. Alone (no -o), no PNG is written.")] = None,
    parquet: Annotated[Optional[Path], typer.Option("--parquet", metavar="DIR", help="A folder of Parquet rows (path, target, logits, relevance totals, float16 heatmap) instead of PNG/NPY, written on Ray; a rerun resumes.")] = None,
    style: Annotated[StyleName, typer.Option("--style", help="signed: diverging colormap over the image; paper: quantized, normalised, jet at alpha 0.4.")] = "signed",
    heat_quantization: Annotated[Optional[int], typer.Option("--heat-quantization", min=0, metavar="LEVELS", help="Quantize the map to this many levels (0: off).", show_default="8 for --style paper, else 0")] = None,
    sign: Annotated[SignName, typer.Option("--sign", help="--style paper: which relevance to show.")] = "positive",
    cmap: Annotated[Optional[str], typer.Option("--cmap", help="Matplotlib colormap.", show_default="coldnhot; jet for --style paper")] = None,
    concepts: Annotated[Optional[int], typer.Option("--concepts", min=1, metavar="K", help="Beside each heatmap, the conditional maps of the K channels of --layer that carry most of its relevance (<heatmap>_concept<j>.png).")] = None,
    *,
    settings: Settings,
) -> None:
    """Explain images: a heatmap PNG per image (relevance over the image)."""
    if parquet is not None:
        given = [name for name in _PICTURE_OPTIONS
                 if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]
        _explain_to_parquet(model, images, parquet, output, npy, given, settings, target)
        return
    with _user_errors():
        options, runtime = settings.build()
        if concepts:  # the channels of --layer are the concepts
            options = replace(options, concept_layer=settings["layer"])
        source = ImageFiles.of(images)  # a missing file, an empty folder: one line, before any work
        count = len(source.items) * (top_k or 1)
        for option, path, suffix in (("--output", output, ".png"), ("--npy", npy, ".npy")):
            if count > 1 and path is not None and path.suffix.lower() == suffix:
                raise OutputError(f"{path}: {count} heatmaps need an output folder for {option}, not a {suffix} file")
        if output is not None and npy is not None and output.resolve() == npy.resolve() and count == 1:
            raise OutputError(f"{output}: --output and --npy name the same file")
        if cmap is not None and not is_colormap(cmap):
            raise SettingError(f"unknown colormap '{cmap}'")
        if top_k and target is not None:
            raise SettingError("--top-k and --target exclude each other")
        # In one process the outputs are staged and appear together: a failure leaves none. On
        # Ray each image's files appear as its batch ends, and a rerun skips what is there.
        local = runtime.cluster is None
        sink = FileSink(output=output, npy=npy, style=style, levels=heat_quantization, sign=sign, cmap=cmap,
                        staged=local, concepts=concepts or 0).plan(len(source.items), top_k)
        sink.check(source.items)  # every destination, before anything is built or written
        if local:  # every image too (on Ray the actors decode their own: the driver holds none)
            source.check()
        explainer = Explainer(model, options, runtime if local else replace(runtime, device="cpu", threads=1))
        explainer.targets(target, 1)  # a bad --target or --top-k is an error before anything is said or run
        if top_k and top_k > explainer.num_classes:
            raise SettingError(f"--top-k {top_k}: the model has {explainer.num_classes} classes")
        if concepts and concepts > explainer.summary.concept_channels:
            raise SettingError(f"--concepts {concepts}: layer '{explainer.summary.concept_layer}' has "
                               f"{explainer.summary.concept_channels} channels")
        for note in explainer.summary.notes:  # before the results: they say what was explained
            typer.echo(f"note: {note}", err=True)
        _explain_folder(explainer, source, sink, runtime, target, top_k)


def _explain_folder(explainer: Explainer, source, sink, runtime: Runtime, target: int | None,
                    top_k: int | None) -> None:
    """runs.explain_folder with a bar, a line per heatmap, then the run's warnings."""
    lines: list[str] = []

    def said(record) -> None:
        taken = np.asarray([record.taken]) if record.taken is not None else None
        concepts = (f"; concepts at {explainer.summary.concept_layer}: "
                    + ", ".join(f"channel {c} {share:.1%}" for c, share in record.concepts)) if record.concepts else ""
        lines.append(f"{record.key}: class {record.target}, initial relevance {record.initial:.4g}, input relevance "
                     f"{record.input_sum:.4g}{_reached(np.asarray([record.reach]), taken, 0)}{concepts} -> "
                     f"{', '.join(record.written)}")

    where = "explaining" if runtime.cluster is None else f"explaining on Ray ({runtime.cluster.concurrency} actor(s))"
    with _progress(disable=runtime.cluster is None and len(source.items) <= runtime.batch_size) as progress:
        task = progress.add_task(where, total=None)
        summary = explain_folder(explainer, source, sink, runtime=runtime, target=target, top_k=top_k, on_result=said,
                                 progress=lambda done, total: progress.update(task, completed=done, total=total))
    if summary.skipped:
        typer.echo(f"note: {summary.skipped} image(s) already explained there: skipped", err=True)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    if summary.explosion is not None and summary.explosion.images:
        typer.echo(f"warning: {explode.message(summary.explosion, explainer.summary.preset, explainer.bias)}", err=True)
    if summary.taken is not None:
        _warn_reach(summary.at_input, summary.taken, explainer.summary.preset, explainer.bias)


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


def _explain_to_parquet(model, images, parquet, output, npy, pictures: list[str], settings: Settings,
                        target: int | None) -> None:
    """explain --parquet DIR: onnxlrp.distributed.explain_dataset (Parquet rows, resumable), with
    every option of the command; those it cannot honour are refused."""
    from .distributed import done_paths, explain_dataset

    with _user_errors():
        if output is not None or npy is not None:
            raise SettingError("--parquet writes Parquet rows only: leave out -o and --npy")
        if pictures:
            flags = ", ".join("--" + name.replace("_", "-") for name in pictures)
            raise SettingError(f"--parquet writes one row per image and no pictures: leave out {flags}")
        options, runtime = settings.build()
        if runtime.cluster is None:  # Parquet rows are written by Ray Data: a local instance by default
            runtime = replace(runtime, cluster=Cluster())
        explain_dataset([str(p) for p in images], model, output=parquet, options=options, runtime=runtime,
                        target=target)
        console.print(f"wrote {parquet}: {len(done_paths(parquet))} image(s) explained (Parquet)", highlight=False,
                      soft_wrap=True)


@app.command(cls=GroupedCommand)
@takes(MODEL.only("size"), RULES.only("preset", "split", "include_identity", "rule"))
def graph(
    model: Model,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    *,
    settings: Settings,
) -> None:
    """Show the residual merges and the rule each node gets under a preset."""
    with _user_errors():
        options = settings.options()
        analysis = analyse(model, options.preset, options.split, image_size=options.image_size,
                           rules=dict(options.rules))
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


@app.command(cls=GroupedCommand)
@takes(*EXPLAINING)
def evaluate(
    model: Model,
    data: Annotated[Path, typer.Argument(help="Image folder: one subfolder per class (order: classes.txt, else by name), optional masks/.", show_default=False, metavar="DATA")],
    methods: Annotated[str, typer.Option("--methods", "-m", help="Comma-separated methods (see --list-methods); also any preset by name, NAME:layer or NAME:gated for an LRP method's Relevance-CAM or gated map, and 'lrp': the explainer the options below describe.")] = ",".join(DEFAULT_METHODS),
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV of 'path,label' lines instead of class subfolders.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate the first N images only.")] = None,
    protocol: Annotated[ProtocolName, typer.Option("--protocol", help="Insertion/Deletion protocol: paper (>= thresholds), exact (tie-robust), or both.")] = "both",
    heat_quantization: Annotated[int, typer.Option("--heat-quantization", min=0, help="Quantize maps to this many levels before the metrics (0: off).")] = 8,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.md, results.json and conservation.png.")] = Path("evaluation"),
    list_methods: Annotated[bool, typer.Option("--list-methods", is_eager=True, callback=_list_methods,
                                               help="List the methods and exit (no MODEL or DATA needed).")] = False,
    *,
    settings: Settings,
) -> None:
    """Compare attribution methods on a labelled image folder: Insertion, Deletion, ID, ground-truth metrics.

    The rules and heatmap options are those of every LRP method, except what a method sets
    itself (a preset, the paper variants' split, a NAME:layer map): giving one of those with
    such a method is an error; method 'lrp' takes them all as given."""
    with _user_errors():
        dataset = load_dataset(data, labels)
        total = min(limit or len(dataset.files), len(dataset.files))
        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        if not chosen:
            raise SettingError("--methods names no method (see --list-methods)")
        for name in chosen:
            clash = settings.flags(fixed_settings(name))
            if clash:
                raise SettingError(f"method {name} sets {', '.join(clash)} itself; leave it out, or use method "
                                   "'lrp' (the explainer the options describe)")
        protocols = PROTOCOLS if protocol == "both" else (protocol,)
        check_writable(output / name for name in RESULT_FILES)  # before the run, not after it
        options, runtime = settings.build()
        with _progress() as progress:
            task = progress.add_task(f"evaluating {len(chosen)} methods", total=total)
            results = run_evaluation(model, dataset, chosen, protocols, heat_quantization, limit=limit,
                                     options=options, runtime=runtime, progress=lambda n: progress.advance(task, n))
        paths = write_results(results, output)
        console.print(results.markdown(), highlight=False, soft_wrap=True)
        for line in results.reach_warnings():
            typer.echo(f"warning: {line}", err=True)
        console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False, soft_wrap=True)


@app.command(cls=GroupedCommand)
@takes(*EXPLAINING)
def audit(
    model: Model,
    data: Annotated[Path, typer.Argument(help="Image folder: one subfolder per class (order: classes.txt, else by name), optional masks/; or flat with --labels; or flat without labels (a production sample: audited on the predicted classes).", show_default=False, metavar="DATA")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.html, report.json and images.csv.")] = Path("audit"),
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV of 'path,label' lines instead of class subfolders.")] = None,
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Folder of object masks mirroring DATA (default: DATA/masks).")] = None,
    against: Annotated[Optional[Path], typer.Option("--against", help="Another model file to compare with (the previous release, the float source of an int8 model).")] = None,
    fail_on: Annotated[Optional[list[str]], typer.Option("--fail-on", metavar="CHECK[=THRESHOLD]",
                                                         help="Checks that fail the audit (repeat or comma-separate; 'none' for none). "
                                                              f"Default: {','.join(DEFAULT_FAIL_ON)}. Checks: "
                                                              f"{', '.join(n for n, c in CHECKS.items() if not c.informational)}.")] = None,
    faithfulness: Annotated[bool, typer.Option("--faithfulness", help="Also Insertion/Deletion per image (tie-robust protocol; slower).")] = False,
    sanity_images: Annotated[int, typer.Option("--sanity-images", min=0, help="Images for the randomisation and random-logit tests (0: skip them).")] = 16,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Audit the first N images only.")] = None,
    concepts: Annotated[bool, typer.Option("--concepts/--no-concepts", help="Per class, the channels of --layer (not 'input') its predictions rest on, with reference images; the channels of a Clever Hans region; concept drift with --against.")] = True,
    *,
    settings: Settings,
) -> None:
    """Audit a deployed model on a folder of images: a report to read and a verdict to gate on.

    Exit code 0: pass; 1: a finding breaks a --fail-on threshold, or bad input; 2: a usage error."""
    with _user_errors(AUDIT_ERROR):
        rules = _fail_on(fail_on)
        dataset = audit_dataset(data, labels, masks)
        total = min(limit or len(dataset.files), len(dataset.files))
        check_writable(output / name for name in REPORT_FILES)  # before the run, not after it
        options, runtime = settings.build()
        with _progress() as progress:
            task = progress.add_task(f"auditing {total} images", total=total + 1)
            result = run_audit(model, data, options=options, runtime=runtime, labels=labels, masks=masks,
                               against=against, fail_on=rules, faithfulness=faithfulness, sanity_images=sanity_images,
                               limit=limit, progress=lambda n: progress.advance(task, n),
                               concepts=settings["layer"] if concepts else None)
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


@app.command(cls=GroupedCommand)
@takes(*EXPLAINING)
def concepts(
    model: Model,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images (subfolders too); a folder's classes.txt names the classes.",
                                                 show_default=False, metavar="IMAGES...")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for atlas.html and atlas.json.")] = Path("atlas"),
    per_class: Annotated[int, typer.Option("--per-class", min=1, help="Concepts shown per class.")] = 5,
    references: Annotated[int, typer.Option("--references", min=1, help="Reference images per concept, by relevance and by activation.")] = 6,
    *,
    settings: Settings,
) -> None:
    """A concept atlas: per class, the channels of --layer its predictions rest on, each with the
    images that show it most, cropped to where it looks (atlas.html, atlas.json)."""
    from .concepts import FILES as ATLAS_FILES, atlas, write as write_atlas

    with _user_errors():
        check_writable(output / name for name in ATLAS_FILES)  # before the run, not after it
        options, runtime = settings.build()
        names = _class_names(images)
        with _progress() as progress:
            task = progress.add_task("concepts", total=None)
            found = atlas(model, images, layer=settings["layer"], per_class=per_class, references=references,
                          class_names=names, options=options, runtime=runtime,
                          progress=lambda done, total: progress.update(task, completed=done, total=total))
        paths = write_atlas(found, output)
        console.print(f"concepts at {found.layer} ({found.channels} channels), {found.images} images:",
                      highlight=False, soft_wrap=True)
        for entry in found.classes:
            shown = ", ".join(f"channel {c} {share:.1%}" for c, share in entry.channels)
            console.print(f"  {entry.name} ({entry.images} images): {shown}", highlight=False, soft_wrap=True)
        console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False, soft_wrap=True)


def _class_names(images: list[Path]) -> list[str] | None:
    """The class names in classes.txt of the one folder given, if it has one."""
    listed = images[0] / "classes.txt" if len(images) == 1 and images[0].is_dir() else None
    return listed.read_text().split() if listed is not None and listed.is_file() else None


@app.command("compile", cls=GroupedCommand)
@takes(MODEL, RULES, HEATMAP)
def compile_model(
    model: Model,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the explainer (.onnx).", show_default=False)],
    *,
    settings: Settings,
) -> None:
    """Save the explainer as an ONNX model (inputs images, target; outputs logits, relevance, ...)."""
    with _user_errors():
        check_writable([output])
        explainer = Explainer(model, settings.options())
        for note in explainer.summary.notes:
            typer.echo(f"note: {note}", err=True)
        explainer.save(output)
        shape = ["N" if explainer.summary.image.batch is None else explainer.summary.image.batch,
                 *explainer.input_shape[1:]]
        console.print(f"wrote {output}: inputs images [{', '.join(map(str, shape))}], target [N]; "
                      "outputs logits, relevance, targets, initial_relevance"
                      + (", merge_relevance" if explainer.merges else "")
                      + (f", heatmap [N, {explainer.summary.height}, {explainer.summary.width}] ({settings['heatmap']})"
                         if settings["heatmap"] != "pixel" else ""), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    app()
