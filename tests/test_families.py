"""Op families as declared types: the registry of op adapters, walked.

Every adapter class (the op types in OPS, and the adapters make_op gives Add/Sub/Mul/Div
of two computed tensors) declares its family and the facts that family needs, so that
nothing outside onnxlrp/lrp/ops reads op-type strings for them (issue 22); a class that
does not fails here, naming itself.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import pytest

import onnxlrp.lrp.ops as ops
from onnxlrp.ir import opinfo
from onnxlrp.ir.opinfo import Family
from onnxlrp.lrp.composites import DEFAULTS, PRESETS
from onnxlrp.lrp.ops.base import LinearOp, Op
from onnxlrp.lrp.ops.gates import GateMul
from onnxlrp.lrp.ops.merge import Difference, ResidualAdd

#: the adapters make_op builds for Add/Sub/Mul/Div of two computed tensors (no op_types of their own)
DISPATCHED = (ResidualAdd, Difference, GateMul)
ADAPTERS = sorted(set(ops.OPS.values()) | set(DISPATCHED), key=lambda cls: cls.__name__)
PACKAGE = Path(ops.__file__).parent


def _own(cls, name):
    """The attribute as the class hierarchy declares it (a property stays a property)."""
    return inspect.getattr_static(cls, name)


def _declared(cls, name) -> bool:
    """Whether `cls` or a parent below Op says it itself (not Op's default)."""
    return any(name in vars(c) for c in cls.__mro__ if c is not Op)


def _needs(cls) -> list[str]:
    """What `cls` fails to declare that its family needs (empty: all there)."""
    family, missing = cls.family, []
    if not isinstance(family, Family):
        return [f"family (got {family!r})"]
    if not isinstance(cls.shape_inputs, tuple) or not all(isinstance(i, int) for i in cls.shape_inputs):
        missing.append("shape_inputs: a tuple of input indices")
    if family in (Family.CONVOLUTION, Family.DENSE):
        if not isinstance(cls.weight_input, int):
            missing.append("weight_input: the input holding its kernel")
        if not issubclass(cls, LinearOp):
            missing.append("a LinearOp: LRP rules need its forward and parameters")
    elif cls.weight_input is not None:
        missing.append("no weight_input: only convolutions and dense layers have a learned kernel")
    if family in (Family.CONVOLUTION, Family.AVERAGE_POOLING, Family.MAX_POOLING, Family.BATCH_NORM):
        if cls.channel_axis != 1:
            missing.append("channel_axis = 1 (ONNX's channels-first ops)")
    if family is Family.GLOBAL_POOLING:
        if not isinstance(_own(cls, "channel_axis"), property):
            missing.append("channel_axis: the axis its pooling keeps (a property of its axes)")
        if not _declared(cls, "pools_globally"):
            missing.append("pools_globally: whether it is a classifier's global pooling")
    elif cls.pools_globally:
        missing.append("pools_globally only for the global pooling family")
    if family is Family.SHAPE and not (cls.carries_bounds and cls.loss_family is None):
        missing.append("carries_bounds and loss_family None: a shape op moves values, none computed")
    if family is Family.AFFINE and not (cls.carries_bounds and cls.carries_factor and issubclass(cls, LinearOp)):
        missing.append("carries_bounds, carries_factor and LinearOp: constant arithmetic is monotone and linear")
    if family in (Family.ACTIVATION, Family.BOUNDED_ACTIVATION, Family.ELEMENTWISE, Family.QUANTIZATION):
        if not cls.shape_preserving:
            missing.append("shape_preserving: an element-wise op")
    if family is Family.BOUNDED_ACTIVATION and _own(cls, "output_range") is _own(Op, "output_range"):
        missing.append("output_range: the interval its output lies in")
    if family is Family.GATE and cls.default_rule != "gate":
        missing.append("default_rule 'gate'")
    if family is Family.MERGE and cls.kind not in ("merge", "difference"):
        missing.append("kind 'merge' or 'difference'")
    if cls.default_rule is not None and cls.default_rule not in DEFAULTS and (cls.kind, cls.default_rule) != (
            "merge", "split"):  # a residual merge gets the chosen Relevance Splitting
        missing.append(f"default_rule one of {sorted(DEFAULTS)} or None")
    if cls.default_rule is None and not issubclass(cls, LinearOp):
        missing.append("a default_rule: only linear ops leave their rule to the presets")
    if cls.makes_factor and not _declared(cls, "op_types"):
        missing.append("op_types: an op that makes a gate's factor is found by its op type")
    return missing


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda cls: cls.__name__)
def test_every_adapter_declares_its_family_and_facts(cls):
    missing = _needs(cls)
    assert not missing, f"{cls.__module__}.{cls.__name__} must declare: {'; '.join(missing)}"


def test_every_adapter_class_in_the_package_is_registered():
    """Defining a class with op_types registers it: no table to edit, no module to list."""
    modules = {m.name for m in pkgutil.iter_modules([str(PACKAGE)])}
    assert {f"{ops.__name__}.{m}" for m in modules} <= set(sys.modules)  # every module imported by ops/__init__
    for name in sorted(modules):
        module = importlib.import_module(f"{ops.__name__}.{name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Op) and cls.__module__ == module.__name__:
                for op_type in cls.__dict__.get("op_types", ()):
                    assert ops.OPS[op_type] is cls, f"{cls.__name__} handles {op_type} but is not registered for it"
                    assert ops.facts(op_type) is cls and opinfo.facts(op_type) is cls
    assert ops.OP_TYPES == frozenset(ops.OPS) and {"Add", "Sub", "Mul", "Div"} <= ops.OP_TYPES


def test_a_second_adapter_for_an_op_type_is_refused():
    with pytest.raises(TypeError, match="two adapters"):
        type("AnotherRelu", (Op,), {"op_types": ("Relu",), "family": Family.ACTIVATION})
    assert ops.OPS["Relu"].__name__ == "Relu"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_names_a_rule_for_every_linear_family(preset):
    """A linear op has no default rule (default_rule None): a preset without a fallback must
    name its family, or a model with such an op would have no rule under it."""
    preset = PRESETS[preset]
    if preset.fallback is not None:
        return
    unnamed = sorted({cls.family.value for cls in ADAPTERS if cls.default_rule is None
                      and not any(t in preset.layers for t in cls.__dict__.get("op_types", ()))}
                     - {family.value for family in preset.families})
    assert not unnamed, f"preset {preset.name} names no rule for the families {unnamed}"


def test_the_ir_imports_nothing_from_lrp():
    """Imports flow one way: ir/ reads op facts through ir/opinfo.py, never from onnxlrp.lrp."""
    for path in sorted((PACKAGE.parent.parent / "ir").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                assert "lrp" not in target.split("."), f"{path.name} imports {target}"
            elif isinstance(node, ast.Import):
                assert not any(".lrp" in alias.name for alias in node.names), f"{path.name} imports onnxlrp.lrp"
