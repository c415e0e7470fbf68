"""The command line's option groups, declared once, and the one function that builds the
objects they describe.

As Polygraphy's argument groups: every command that explains takes every group (model and
preprocessing, rules, heatmap, runtime, Ray), so each option reads the same in every
``--help`` and none can be dropped on the way to the Python API. A command says which groups
it takes with ``@takes(...)``; the group options then reach it as one :class:`Settings`,
whose :meth:`Settings.build` is the only place the command line makes an
:class:`~onnxlrp.options.Options` and a :class:`~onnxlrp.options.Runtime`. ``--help`` shows
each group under its own heading.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional

import typer
from typer.core import TyperCommand

try:  # typer >= 0.29 vendors click and does not re-export it
    from typer._click.globals import get_current_context
    from typer._click.core import ParameterSource
except ImportError:  # pragma: no cover - typer on the real click
    from click import get_current_context
    from click.core import ParameterSource

from .io.preprocessing import PREPROCESSING
from .lrp import rules as rules_module
from .lrp.composites import PRESETS
from .lrp.heatmaps import KINDS
from .lrp.splitting import SPLITS
from .options import PRECISIONS, Options, Runtime
from .runtime.cluster import Cluster, import_ray, quiet
from .runtime.session import DEVICES


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


def _parse_rules(specs: list[str] | None) -> list[tuple[str, Any]] | None:
    """--rule KEY=RULE(ARGS), repeated -> the rule overrides; a bad spec is a usage error."""
    if not specs:
        return None
    try:
        return [rules_module.parse(spec) for spec in specs]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@dataclass(frozen=True)
class Group:
    """Options that belong together, under one heading of --help."""

    title: str
    params: tuple[inspect.Parameter, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def only(self, *names: str) -> Group:
        """Part of the group, for a command that shows the model but runs nothing (graph)."""
        unknown = set(names) - set(self.names)
        assert not unknown, unknown
        return Group(self.title, tuple(p for p in self.params if p.name in names))


def _group(title: str, **options: tuple[Any, Any]) -> Group:
    """A group from name=(annotated type, default); every option shown under `title`."""
    params = []
    for name, (annotation, default) in options.items():
        kind, info = annotation.__origin__, annotation.__metadata__[0]
        info.rich_help_panel = title
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, info]))
    return Group(title, tuple(params))


_BOUND = "z^B {} box bound."

MODEL = _group(
    "Model and preprocessing",
    preprocess=(Annotated[Literal[tuple(PREPROCESSING)], typer.Option(  # type: ignore[valid-type]
        "--preprocess", metavar="NAME", help=f"Input normalisation: {', '.join(PREPROCESSING)}.")], "imagenet"),
    size=(Annotated[Optional[str], typer.Option(
        "--size", metavar="N|HxW", callback=_parse_size, show_default="224",
        help="Input height and width where the model leaves them open: N, or HxW.")], None),
)

RULES = _group(
    "Rules",
    preset=(Annotated[Literal[tuple(PRESETS)], typer.Option(  # type: ignore[valid-type]
        "--preset", "-p", metavar="PRESET", help=f"Rule preset: {', '.join(PRESETS)}.")], "epsilon-plus-flat"),
    split=(Annotated[Optional[Literal[SPLITS]], typer.Option(  # type: ignore[valid-type]
        "--split", "-s", show_default="the preset's, ratio", help="Relevance Splitting at residual merges.")], None),
    include_identity=(Annotated[Optional[bool], typer.Option(
        "--include-identity/--exclude-identity", show_default="include",
        help="Whether identity skips take part in the split.")], None),
    bias=(Annotated[bool, typer.Option(
        "--bias/--no-bias", help="Keep biases in the rules (--no-bias: Zennit's zero_params=['bias']).")], True),
    low=(Annotated[Optional[float], typer.Option(
        "--low", show_default="pixel 0 after preprocessing", help=_BOUND.format("lower"))], None),
    high=(Annotated[Optional[float], typer.Option(
        "--high", show_default="pixel 255 after preprocessing", help=_BOUND.format("upper"))], None),
    rule=(Annotated[Optional[list[str]], typer.Option(
        "--rule", metavar="KEY=RULE(ARGS)", callback=_parse_rules,
        help="Override the preset's rule for a node (by name, as `onnxlrp graph` lists them) or an op type; "
             "repeatable: Conv=epsilon(0.25), /layer4/layer4.0/conv1/Conv=gamma(gamma=0.1), Conv=zplus(fallback=flat). "
             "Rules: epsilon, norm, zplus, alpha_beta, gamma, flat, w2, zbox, avg2x2, pass, gradient, guided, gate.")],
        None),
    precision=(Annotated[Literal[PRECISIONS], typer.Option(  # type: ignore[valid-type]
        "--precision", help="Precision of the relevance pass (fp16: for GPUs; inputs and outputs stay float32).")],
        "fp32"),
)

HEATMAP = _group(
    "Heatmap",
    heatmap=(Annotated[Literal[KINDS], typer.Option(  # type: ignore[valid-type]
        "--heatmap", help="pixel: the input relevance; layer: Relevance-CAM at --layer; gated: pixel relevance "
                          "gated by the positive layer relevance (neither conserves).")], "pixel"),
    layer=(Annotated[str, typer.Option(
        "--layer", metavar="NAME", help="Where --heatmap layer/gated and --concepts look: 'last' (the last conv block), 'input', "
                                        "or a node (onnxlrp graph lists them) or tensor name.")], "last"),
)

RUNTIME = _group(
    "Runtime",
    device=(Annotated[Literal[DEVICES], typer.Option(  # type: ignore[valid-type]
        "--device", help="onnxruntime execution provider.")], "cpu"),
    threads=(Annotated[Optional[int], typer.Option(
        "--threads", min=1, show_default="onnxruntime's choice", help="onnxruntime's intra-op threads.")], None),
    batch_size=(Annotated[int, typer.Option("--batch-size", min=1, help="Images per onnxruntime run.")], 16),
    cache=(Annotated[bool, typer.Option(
        "--cache/--no-cache", help="Reuse compiled explainers from the on-disk cache (ONNXLRP_CACHE).")], True),
)

RAY = _group(
    "Ray",
    ray=(Annotated[bool, typer.Option("--ray", help="Run on a local Ray instance (pip install 'onnxlrp[ray]').")],
         False),
    ray_address=(Annotated[Optional[str], typer.Option(
        "--ray-address", metavar="ADDRESS",
        help="Run on this Ray cluster ('auto': the one `ray start` runs here); implies --ray.")], None),
    concurrency=(Annotated[int, typer.Option(
        "--concurrency", min=1, help="With --ray: actors, one onnxruntime session each.")], 1),
)

#: what every command that explains takes
EXPLAINING = (MODEL, RULES, HEATMAP, RUNTIME, RAY)


@dataclass(frozen=True)
class Settings:
    """What a command's option groups were given: the values, and which were given on the
    command line (not defaults)."""

    values: dict[str, Any]
    given: frozenset[str]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def options(self) -> Options:
        """The Options the groups describe (defaults for a group the command does not take)."""
        v = self.values
        names = {"preprocess": "preprocessing", "size": "image_size", "rule": "rules"}
        made = {names.get(k, k): v[k] for k in (*MODEL.names, *RULES.names, *HEATMAP.names) if k in v}
        if made.get("rules") is not None:
            made["rules"] = dict(made["rules"])
        if made.get("image_size") is not None:
            made["image_size"] = tuple(made["image_size"])
        return Options.make(**made)

    def runtime(self) -> Runtime:
        """The Runtime the groups describe. Asking for Ray without the extra installed is an
        error here, before anything is built."""
        v = self.values
        cluster = None
        if v.get("ray") or v.get("ray_address"):
            import_ray()
            quiet()
            cluster = Cluster(v.get("ray_address"), v.get("concurrency", 1))
        return Runtime(**{k: v[k] for k in RUNTIME.names if k in v}, cluster=cluster)

    def build(self) -> tuple[Options, Runtime]:
        """The one place the command line makes the objects the Python API takes."""
        return self.options(), self.runtime()

    def flags(self, names) -> list[str]:
        """The given options among `names`, as the user wrote them (--split), for messages."""
        return ["--" + n.replace("_", "-") for n in names if n in self.given]


def takes(*groups: Group) -> Callable[[Callable], Callable]:
    """A command that takes these option groups: its own parameters, then every option of the
    groups; the command receives the group options as one `settings: Settings` argument."""

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
        grouped = [p for group in groups for p in group.params]
        names = [p.name for p in grouped]

        @functools.wraps(command)
        def run(*args, **kwargs):
            ctx = get_current_context()
            values = {name: kwargs.pop(name) for name in names}
            given = frozenset(n for n in names if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT))
            return command(*args, settings=Settings(values, given), **kwargs)

        run.__signature__ = inspect.Signature(own + grouped)
        run.__annotations__ = {p.name: p.annotation for p in own + grouped}
        run.groups = groups  # for the test that compares each command with its groups
        return run

    return decorate


class GroupedCommand(TyperCommand):
    """--help with each option group under its own heading, the command's own options first."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                title = "Arguments"
            else:
                title = getattr(param, "rich_help_panel", None) or "Options"
            sections.setdefault(title, []).append(record)
        order = ["Arguments", "Options"] + [t for t in sections if t not in ("Arguments", "Options")]
        for title in order:
            if title in sections:
                with formatter.section(title):
                    formatter.write_dl(sections[title])


__all__ = ["EXPLAINING", "HEATMAP", "MODEL", "RAY", "RULES", "RUNTIME", "GroupedCommand", "Group", "Settings",
           "takes"]
