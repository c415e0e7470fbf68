"""How much of the explained logit reaches the pixels, and which ops lose the rest (issue 21).

    python benchmarks/reach.py                         # all models, the 120 images of examples/shapes
    python benchmarks/reach.py --images 48 --models models/mobile/mobilenet.onnx

For every model (default: models/mobile/*.onnx, the depthwise zoo fixtures and the demo model)
and every preset in PRESETS, with biases kept and without (--no-bias):

  1. reach: the median over images of input relevance / initial relevance (the target logit);
  2. with trace=True, per op family (first layer, depthwise Conv, grouped Conv, other Conv,
     Gemm, ReLU6 / ReLU / other activations, gates (Mul), pools, merges, ...): the median over
     ops of each op's median share handed on (sum of R at its inputs / sum of R at its output),
     the worst op, and "took": the relevance the family's ops absorbed, summed, as a share of
     the initial relevance (median over images; the families' "took" add up to 1 - reach,
     up to rounding);
  3. for every depthwise conv (group == channels > 1), from the model's weights and its
     activations (onnxruntime, with the depthwise inputs and outputs as extra outputs): how
     often the per-output z+ denominator without bias, sum over the window of (w x)^+, is
     exactly 0, below 1e-6 (onnxlrp's absolute z+ stabiliser: there z+ hands on at most half)
     or below 1e-6 x the layer's median positive denominator; over all outputs and over
     "alive" outputs (conv output with bias > 0, where an activation passes relevance on), and
     the share of the alive outputs' activation mass sitting at zero denominators; next to the
     conv's handed-on share under epsilon-plus-flat without bias.

Only onnxlrp's public API is used (Explainer, Explanation.layer_sums, Explainer.analysis).
No compiled explainer is cached (cache=False), so the numbers are those of the code checked out.
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxlrp import Explainer  # noqa: E402

PRESETS = ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1")
ZOO = ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny")
ACTIVATIONS = {"Clip": "ReLU6 (Clip)", "Relu": "ReLU", "HardSwish": "HardSwish", "Sigmoid": "Sigmoid", "Gelu": "GELU",
               "HardSigmoid": "HardSigmoid", "Erf": "Erf"}
FAMILY_ORDER = ("first layer", "Conv depthwise", "Conv grouped", "Conv other", "Gemm/MatMul", "ReLU6 (Clip)", "ReLU",
                "HardSwish", "GELU", "gate (Mul)", "pool", "merge (Add)")


def default_models() -> list[Path]:
    models = sorted((ROOT / "models" / "mobile").glob("*.onnx"))
    models += [ROOT / "tests" / "fixtures" / "zoo" / f"{name}.onnx" for name in ZOO]
    models.append(ROOT / "models" / "demo" / "tiny_resnet.onnx")
    return [m for m in models if m.exists()]


def conv_kind(node) -> str:
    """depthwise (group == input channels > 1), grouped (1 < group < channels) or other."""
    group = int(node.attrs.get("group", 1))
    weight = node.inputs[1]
    per_group = int(weight.shape[1]) if getattr(weight, "shape", None) is not None else 0
    if group > 1 and per_group == 1:
        return "Conv depthwise"
    return "Conv grouped" if group > 1 else "Conv other"


def family(op, first: bool) -> str:
    kind, op_type = op.kind, op.node.op
    if first:
        return "first layer"
    if op_type == "Conv":
        return conv_kind(op.node)
    if op_type in ("Gemm", "MatMul"):
        return "Gemm/MatMul"
    if kind == "merge":
        return "merge (Add)"
    if kind == "gate" or op_type == "Mul":
        return "gate (Mul)"
    if kind == "pool" or "Pool" in op_type or op_type == "ReduceMean":
        return "pool"
    if op_type in ACTIVATIONS:
        return ACTIVATIONS[op_type]
    return f"{op_type} ({kind})"


def op_families(explainer: Explainer, names: list[str]) -> list[str]:
    ops = explainer.analysis.graph.ops
    linear = [n for n, op in ops.items() if op.node.op in ("Conv", "Gemm", "MatMul")]
    first = linear[0] if linear else None
    return [family(ops[n], n == first) for n in names]


def load_inputs(images: int) -> np.ndarray:
    files = sorted(glob.glob(str(ROOT / "examples" / "shapes" / "*" / "*.png")))
    files = [f for f in files if "/masks/" not in f][:images]
    probe = Explainer(ROOT / "models" / "demo" / "tiny_resnet.onnx", cache=False)
    _, pixels = probe.load_images(files)
    return probe.images.normalize(pixels)


def explain(model: Path, preset: str, bias: bool, x: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer = Explainer(model, preset=preset, bias=bias, trace=True, cache=False)
        result = explainer.explain(x, warn=False)
    return explainer, result


def family_table(explainer: Explainer, result) -> dict[str, dict]:
    sums = result.layer_sums.astype(np.float64)  # [N, L, 3]: out, in, |R| out
    out, inp = sums[..., 0], sums[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(np.abs(out) > 0, inp / out, np.nan)  # [N, L]
        took = (out - inp) / result.initial.astype(np.float64)[:, None]  # [N, L] share of the logit
    families = op_families(explainer, result.layer_names)
    table: dict[str, dict] = {}
    for name in dict.fromkeys(families):
        idx = [i for i, f in enumerate(families) if f == name]
        per_op = np.nanmedian(share[:, idx], axis=0)
        table[name] = {"ops": len(idx), "median": float(np.nanmedian(per_op)), "worst": float(np.nanmin(per_op)),
                       "took": float(np.nanmedian(took[:, idx].sum(axis=1)))}
    per_node = dict(zip(result.layer_names, np.nanmedian(share, axis=0)))
    return table | {"_per_node": per_node}


# --- z+ denominators at the depthwise convs --------------------------------------------------------
def depthwise_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    weights = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in weights:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group > 1 and weights[node.input[1]].dims[1] == 1:
            found.append(node)
    return found


def run_with(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in dict.fromkeys(names):
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    values = session.run(list(dict.fromkeys(names)), feed)
    return dict(zip(dict.fromkeys(names), values))


def zplus_denominator(x: np.ndarray, w: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """sum over each output's window of (w x)^+ (no bias), for a depthwise conv: [N, C, H', W']."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kh, kw = w.shape[2:]
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    pads = attrs.get("pads", [0, 0, 0, 0])
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError(f"{node.name}: auto_pad not handled")
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    z = np.zeros((x.shape[0], x.shape[1], ho, wo), np.float64)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
            z += np.maximum(window * w[None, :, 0, i, j, None, None], 0)
    return z


def depthwise_stats(path: Path, x: np.ndarray) -> list[dict]:
    model = onnx.load(str(path))
    nodes = depthwise_nodes(model)
    if not nodes:
        return []
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    consumers = defaultdict(list)
    for n in model.graph.node:
        for name in n.input:
            consumers[name].append(n.op_type)
    values = run_with(model, [n.input[0] for n in nodes] + [n.output[0] for n in nodes], x)
    rows = []
    for node in nodes:
        w = weights[node.input[1]].astype(np.float64)
        zp = zplus_denominator(values[node.input[0]].astype(np.float64), w, node)
        z = values[node.output[0]].astype(np.float64)  # with the (folded BatchNorm) bias
        assert zp.shape == z.shape, (node.name, zp.shape, z.shape)
        scale = float(np.median(zp[zp > 0])) if np.any(zp > 0) else 0.0
        # where relevance can arrive: a ReLU passes it where z > 0, a ReLU6 where 0 < z < 6; otherwise
        # (SiLU, a linear next layer) any z != 0 gets some, the next z+ layer's negative-times-negative part
        after = consumers[node.output[0]]
        if after == ["Relu"]:
            alive = z > 0
        elif after == ["Clip"]:
            alive = (z > 0) & (z < 6)
        else:
            alive = z != 0
        small = zp < 1e-6
        mass = np.where(alive, np.abs(z), 0)
        rows.append({
            "node": node.name, "kernel": int(w.shape[2]), "channels": int(w.shape[0]), "next": "+".join(after),
            "zero": float((zp == 0).mean()), "below_eps": float(small.mean()),
            "below_rel": float((zp < 1e-6 * scale).mean()),
            "alive": float(alive.mean()),
            "alive_zero": float((zp[alive] == 0).mean()) if alive.any() else 0.0,
            "alive_below_eps": float(small[alive].mean()) if alive.any() else 0.0,
            "alive_mass_below_eps": float(mass[small].sum() / max(mass.sum(), 1e-30)),
        })
    return rows


def clip_stats(path: Path, x: np.ndarray) -> dict | None:
    """ReLU6 (Clip 0..6): the share of its inputs above 6 (there the clip absorbs relevance)."""
    model = onnx.load(str(path))
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    if not clips:
        return None
    values = run_with(model, [n.input[0] for n in clips], x)
    above = [float((values[n.input[0]] > 6).mean()) for n in clips]
    return {"clips": len(clips), "median": float(np.median(above)), "max": float(np.max(above))}


# --- report ---------------------------------------------------------------------------------------
def pct(v: float) -> str:
    if not np.isfinite(v):
        return "nan"
    if v != 0 and abs(v) < 1e-3:
        return f"{v * 100:.1e}%"
    return f"{v * 100:.1f}%"


def report(args, names: list[str], width: int, reach: dict, families: dict) -> None:
    print("Median share of the target logit at the input (input_sum / initial), per model x preset x bias")
    print(f"{'model':<{width}}" + "".join(f"{p + (' bias' if b else ' no-bias'):>30}" for p in args.presets
                                          for b in (True, False)))
    for n in names:
        print(f"{n:<{width}}" + "".join(f"{pct(reach[n, p, b][0]):>30}" for p in args.presets for b in (True, False)))

    for bias in (False, True):
        print(f"\nPer op family, bias={bias}: ops, median share handed on (in/out) over ops, worst op, "
              "and 'took' = what the family absorbed as a share of the logit (median over images)")
        for n in names:
            for p in args.presets:
                table = families.get((n, p, bias))
                if table is None:
                    continue
                keys = [k for k in FAMILY_ORDER if k in table] + sorted(k for k in table if k not in FAMILY_ORDER and k[0] != "_")
                cells = []
                for k in keys:
                    t = table[k]
                    if t["median"] > 0.9995 and t["worst"] > 0.9995 and abs(t["took"]) < 5e-4:
                        cells.append(f"{k}[{t['ops']}] ok")  # conserves: every op hands on > 99.95 %
                    else:
                        cells.append(f"{k}[{t['ops']}] {pct(t['median'])} (worst {pct(t['worst'])}, took {pct(t['took'])})")
                print(f"  {n:<{width}} {p:<22} reach {pct(reach[n, p, bias][0]):>9}: " + "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", type=Path, help="ONNX files (default: see above)")
    parser.add_argument("--images", type=int, default=120, help="first N images of examples/shapes")
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--depthwise-only", action="store_true",
                        help="only the ReLU6 and depthwise tables (runs only epsilon-plus-flat without bias)")
    args = parser.parse_args()
    if args.depthwise_only:
        args.presets = ["epsilon-plus-flat"]
    models = args.models or default_models()
    x = load_inputs(args.images)
    print(f"{len(x)} images of examples/shapes, {len(models)} models, presets {', '.join(args.presets)}\n", flush=True)
    reach: dict = {}
    families: dict = {}
    dw_share: dict = {}
    errors: list[str] = []
    start = time.time()
    for model in models:
        name = model.stem
        for preset in args.presets:
            for bias in ((False,) if args.depthwise_only else (True, False)):
                try:
                    explainer, result = explain(model, preset, bias, x)
                except Exception as error:  # noqa: BLE001 - reported, not hidden
                    errors.append(f"{name} {preset} bias={bias}: {type(error).__name__}: {error}")
                    reach[name, preset, bias] = (float("nan"), float("nan"))
                    continue
                ratio = result.input_sum / result.initial.astype(np.float64)
                reach[name, preset, bias] = (float(np.median(ratio)), float(np.mean(result.logits.argmax(1) == result.targets)))
                table = family_table(explainer, result)
                families[name, preset, bias] = table
                if preset == "epsilon-plus-flat" and not bias:
                    dw_share[name] = table["_per_node"]
        print(f"  {name}: done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)

    names = [m.stem for m in models]
    width = max(len(n) for n in names) + 2
    if args.depthwise_only:
        print("(--depthwise-only: reach and op-family tables skipped)")
    else:
        report(args, names, width, reach, families)

    print("\nReLU6 (Clip): share of the inputs above 6, median and max over the Clip nodes")
    for model in models:
        stats = clip_stats(model, x)
        if stats:
            print(f"  {model.stem:<{width}} {stats['clips']} Clips: median {pct(stats['median'])}, max {pct(stats['max'])}")

    print("\nDepthwise convs: per-output z+ denominator without bias (sum of (w x)^+ over the window), "
          "share of outputs where it is 0, < 1e-6 (the absolute stabiliser), < 1e-6 x the layer's median positive "
          "denominator; 'alive' = outputs that can receive relevance (next op ReLU: z > 0, ReLU6: 0 < z < 6, "
          "else z != 0; z with bias); mass<eps = share of |z| over alive outputs at denominators < 1e-6; handed = the conv's median in/out share under "
          "epsilon-plus-flat, no bias")
    for model in models:
        try:
            rows = depthwise_stats(model, x)
        except Exception as error:  # noqa: BLE001
            errors.append(f"{model.stem} depthwise stats: {type(error).__name__}: {error}")
            continue
        if not rows:
            continue
        print(f"  {model.stem}")
        print(f"    {'node':<58}{'next':>9}{'k':>2}{'C':>5}{'=0':>9}{'<1e-6':>9}{'<rel':>9}{'alive':>8}{'alive=0':>9}{'alive<eps':>10}"
              f"{'mass<eps':>9}{'handed':>8}")
        shares = dw_share.get(model.stem, {})
        for r in rows:
            handed = shares.get(r["node"], float("nan"))
            print(f"    {r['node'][-58:]:<58}{r['next'][:8]:>9}{r['kernel']:>2}{r['channels']:>5}{pct(r['zero']):>9}{pct(r['below_eps']):>9}"
                  f"{pct(r['below_rel']):>9}{pct(r['alive']):>8}{pct(r['alive_zero']):>9}{pct(r['alive_below_eps']):>10}"
                  f"{pct(r['alive_mass_below_eps']):>9}{pct(handed):>8}")
    if errors:
        print("\nErrors:")
        for line in errors:
            print(f"  {line}")


if __name__ == "__main__":
    main()
