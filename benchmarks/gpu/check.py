"""The GPU check (issue 13): everything the CUDA path needs measured, in one run that writes
its results to a folder as it goes.

    python benchmarks/gpu/check.py --out OUT                       # on the GPU machine (run.sh)
    python benchmarks/gpu/check.py --device cpu --quick --out DIR  # a rehearsal on the CPU

Sections, in this order, each within its share of --budget seconds (a section that runs out
of time says what it left out, and the next one starts):

environment   GPU, driver, onnxruntime and its providers, torch, cuDNN
correctness   resnet18 and resnet50 (torchvision, seeded weights, 224x224, 2 images): every
              LRP preset, the paper's variant (iv), the Relevance-CAM and gated maps and the
              baselines on the GPU against the same method on the CPU (relative L2 of the maps,
              and of the full relevance for LRP); fp16 LRP against CPU fp32; TF32 on against off
throughput    resnet50, fp32 and fp16, batch 1 to 256: onnxruntime's plain forward, onnxlrp
              explain (epsilon-plus-flat, epsilon) end to end and its session alone with inputs
              and outputs on the GPU, Zennit (torch CUDA); images/s, peak GPU memory (NVML:
              the device's used memory minus what was used before the process started), and
              the ratio to the convolution floor (3 forward passes for epsilon-plus-flat: the
              forward, W+ x and the transpose; 2 for epsilon)
profile       onnxruntime's profile of one fp16 relevance pass: time per op type and provider,
              nodes that fell back to the CPU, host-device copies
options       CUDA provider settings on the fp16 and fp32 pass: NHWC layout, cuDNN algorithm
              search, TF32
tensorrt      whether onnxruntime's TensorRT provider starts here

Every measurement of speed or memory runs in its own fresh process (this script with
--worker), so one configuration's memory arena and cuDNN choices do not leak into the next.
Files under --out: results.md (the tables), results.json (every number), profile.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import bench  # noqa: E402  (the CPU benchmark's models and Zennit composites)
from bench import exported  # noqa: E402

#: the share of --budget each section may take
SHARES = {"environment": 0.02, "correctness": 0.35, "throughput": 0.4, "profile": 0.08, "options": 0.13,
          "tensorrt": 0.02}
CORRECTNESS_METHODS = (
    "epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1", "epsilon", "paper-iv", "lrp-captum",
    "relevance-cam", "gated-lrp", "gradient", "gradient-x-input", "integrated-gradients", "guided-backprop",
    "grad-cam", "score-cam",
)
FP16_METHODS = ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1", "epsilon", "paper-iv")
#: forward passes' worth of convolutions a preset needs: the forward, the rule's modified
#: forward (W+ x for the z+ rules), and the transpose (the issue's "convolution floor")
FLOOR = {"epsilon-plus-flat": 3, "epsilon": 2}


# ---------------------------------------------------------------- small helpers

class Clock:
    """The budget: seconds left for the whole run and for the section running now."""

    def __init__(self, budget: float):
        self.end = time.monotonic() + budget
        self.budget = budget
        self.section_end = self.end

    def start(self, section: str) -> None:
        self.section_end = min(self.end, time.monotonic() + SHARES[section] * self.budget)

    def left(self) -> float:
        return self.section_end - time.monotonic()


class GpuMemory:
    """Peak device memory in use while a worker runs: NVML's used memory of the whole device,
    polled every 2 ms, minus its value when the worker started (one process on the GPU at a
    time, so the difference is this process: CUDA context, weights, arena, workspaces)."""

    def __init__(self, device: str):
        self.handle, self.peak, self.base = None, 0, 0
        if device != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML: memory stays n/a
            return
        self._used = lambda: pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.base = self.peak = self._used()
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while True:
            self.peak = max(self.peak, self._used())
            time.sleep(0.002)

    def peak_mib(self) -> float | None:
        return None if self.handle is None else (self.peak - self.base) / 2**20


def relative_l2(value: np.ndarray, reference: np.ndarray) -> float:
    """The largest per-image ||value - reference|| / ||reference||, in float64."""
    value, reference = (np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in (value, reference))
    norms = np.maximum(np.linalg.norm(reference, axis=1), 1e-300)
    return float((np.linalg.norm(value - reference, axis=1) / norms).max())


def images(explainer, count: int) -> np.ndarray:
    """The shipped demo image and seeded random ones, as the model's input batch."""
    pixels = explainer.read_images([ROOT / "examples" / "demo.png"])
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(count - 1,) + pixels.shape[1:], dtype=np.uint8)
    return explainer.images.normalize(np.concatenate([pixels, noise])[:count])


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def fmt(value, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def set_cuda_options(**options: str) -> None:
    """Override onnxlrp's CUDA provider settings in this process (run in workers)."""
    from onnxlrp.runtime import session
    session.CUDA_OPTIONS.update(options)


def load_cuda_libraries() -> None:
    """CUDA and cuDNN for onnxruntime: from the nvidia-* packages torch brought (preload_dlls),
    or by importing torch first where that finds them instead (GPU_CHECK_TORCH_FIRST, set by
    start_cuda for the workers)."""
    if os.environ.get("GPU_CHECK_TORCH_FIRST"):
        import torch  # noqa: F401
    import onnxruntime as ort
    ort.preload_dlls()


def start_cuda() -> str:
    """Make sure onnxruntime's CUDA provider starts; how it did, in words."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    for torch_first in ("", "1"):
        os.environ["GPU_CHECK_TORCH_FIRST"] = torch_first
        load_cuda_libraries()
        used = ort.InferenceSession(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]).get_providers()
        if used[0] == "CUDAExecutionProvider":
            return "CUDA provider starts" + (" after importing torch" if torch_first else " (preload_dlls)")
    sys.exit("check: onnxruntime's CUDA provider does not start here (see the log above)")


# ---------------------------------------------------------------- worker side (one configuration)

def worker(job: dict) -> dict:
    """Set up one configuration, then for each batch size (ascending: the memory arena only
    grows, so each batch's peak is what that batch needs): warm-up runs, timed runs, median."""
    memory = GpuMemory(job["device"])
    set_cuda_options(**job.get("cuda_options", {}))
    sync, size = (lambda: None), job["size"]
    what, out = job["what"], {"batches": {}}
    start = time.perf_counter()
    if job["device"] == "cuda":
        load_cuda_libraries()
    if what in ("ort", "session", "onnxlrp"):
        import onnxruntime as ort
        from onnxlrp.runtime.session import providers
    if what == "ort":  # the model itself: default session options, TF32 as in onnxlrp's sessions
        path = job["onnx"]
        if job["precision"] == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16
            half = Path(path).with_suffix(".fp16.onnx")
            if not half.exists():
                onnx.save(convert_float_to_float16(onnx.load(path), keep_io_types=True), half)
            path = str(half)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sess = ort.InferenceSession(path, options, providers=providers(job["device"]))
        name = sess.get_inputs()[0].name
        make = lambda x: (lambda: sess.run(None, {name: x}))
    elif what in ("onnxlrp", "session"):
        from onnxlrp import Explainer
        os.environ["ONNXLRP_CACHE"] = job["cache"]
        ex = Explainer(job["onnx"], preset=job["preset"], device=job["device"], precision=job["precision"])
        if what == "onnxlrp":  # end to end: host batch in, every output back on the host
            make = lambda x: (lambda: ex.explain(x, batch_size=len(x)))
        else:  # the relevance pass alone: inputs on the device before, outputs left there
            sess, device = ex.runner.session, job["device"]

            def make(x):
                binding = sess.io_binding()
                binding.bind_ortvalue_input("images", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
                binding.bind_ortvalue_input("target", ort.OrtValue.ortvalue_from_numpy(
                    np.full(len(x), -1, np.int64), device, 0))
                for output in sess.get_outputs():
                    binding.bind_output(output.name, device)
                return lambda: sess.run_with_iobinding(binding)
    else:  # zennit
        import torch
        from bench import torch_model, zennit_attributor
        torch_device = "cuda" if job["device"] == "cuda" else "cpu"
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # as onnxlrp's fp32
        model, _ = torch_model(job["arch"], torch_device)
        dtype = torch.float16 if job["precision"] == "fp16" else torch.float32
        model = model.to(dtype)
        if torch_device == "cuda":
            sync = torch.cuda.synchronize
        attributor = zennit_attributor(model, job["preset"])
        make = lambda x: (lambda xt=torch.from_numpy(x).to(torch_device, dtype): attributor(xt))
    out["setup_s"] = time.perf_counter() - start
    rng = np.random.default_rng(0)
    for batch in job["batches"]:
        x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        try:
            fn = make(x)
            first = time.perf_counter()
            fn()
            sync()
            first = time.perf_counter() - first
            for _ in range(job["warmup"] - 1):
                fn()
            sync()
            times = []
            for _ in range(job["repeats"]):
                t = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t)
        except Exception as exc:  # out of memory at a large batch, say: keep the smaller ones
            out["batches"][str(batch)] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            break
        seconds = statistics.median(times)
        out["batches"][str(batch)] = {"seconds": seconds, "images_per_s": batch / seconds, "first_run_s": first,
                                      "peak_mib": memory.peak_mib()}
    return out


def run_worker(job: dict, timeout: float) -> dict:
    """One configuration in a fresh process; its error, not an exception, if it fails."""
    if timeout < 5:
        return {"error": "skipped: out of time"}
    try:
        proc = subprocess.run([sys.executable, __file__, "--models", str(bench.CACHE), "--worker", json.dumps(job)],
                              capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        return {"error": " / ".join(tail)[-400:] or f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- sections (parent side)

def environment(ctx) -> tuple[dict, str]:
    import onnxruntime as ort
    info = {"python": platform.python_version(), "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(), "cpu_count": os.cpu_count()}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"n/a ({type(exc).__name__})"
    try:
        import torch
        info.update(torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        info["torch"] = None
    info["cuda_provider"] = getattr(ctx, "cuda", "not asked for")
    lines = [f"- {key}: {value}" for key, value in info.items()]
    return info, "\n".join(lines)


def correctness(ctx) -> tuple[dict, str]:
    """Each method on the device against the same method on the CPU."""
    from onnxlrp.runtime import session
    saved = dict(session.CUDA_OPTIONS)
    try:
        return _correctness(ctx)
    finally:  # the next sections run with onnxlrp's own settings
        session.CUDA_OPTIONS.clear()
        session.CUDA_OPTIONS.update(saved)


def _correctness(ctx) -> tuple[dict, str]:
    from onnxlrp import Explainer
    from onnxlrp.evaluation.baselines import LRP_METHODS, methods
    set_cuda_options(cudnn_conv_algo_search="HEURISTIC")  # correctness: no per-shape benchmarking of algorithms
    results, rows = {}, []
    for arch in ctx.archs:
        folded = exported(arch, ctx.size, keep_batchnorm=False)
        with_bn = exported(arch, ctx.size, keep_batchnorm=True)
        probe = Explainer(folded, device="cpu")
        x = images(probe, 2)
        black = probe.images.normalize(np.zeros((1, ctx.size, ctx.size, 3), np.uint8))[0]
        targets = probe.explain(x).targets
        for name in ctx.methods:
            if ctx.clock.left() < 20:
                results[f"{arch} {name}"] = {"error": "skipped: out of time"}
                continue
            if name == "score-cam" and arch != ctx.archs[0]:
                continue  # one forward pass per channel and image: the first architecture is enough
            _, preset, extra = LRP_METHODS.get(name, ("", name, {}))  # a preset by its own name otherwise
            model = with_bn if preset == "paper" else folded
            try:
                cpu = methods(model, black, device="cpu")[name]()
                gpu = methods(model, black, device=ctx.device)[name]()
                row = {"map": relative_l2(gpu(x, targets), cpu(x, targets))}
                if cpu.explainer is not None:
                    row["relevance"] = relative_l2(gpu.last[0].relevance, cpu.last[0].relevance)
                    if name in FP16_METHODS:
                        half = Explainer(model, preset=preset, device=ctx.device, precision="fp16", **extra)
                        row["fp16_relevance"] = relative_l2(half.explain(x, targets).relevance, cpu.last[0].relevance)
                    if name == "epsilon-plus-flat" and ctx.device == "cuda":
                        set_cuda_options(use_tf32="1")
                        tf32 = Explainer(model, device=ctx.device)
                        row["tf32_relevance"] = relative_l2(tf32.explain(x, targets).relevance, cpu.last[0].relevance)
                        set_cuda_options(use_tf32="0")
            except Exception as exc:
                row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            results[f"{arch} {name}"] = row
            rows.append([arch, name, fmt(row.get("map"), ".1e"), fmt(row.get("relevance"), ".1e"),
                         fmt(row.get("fp16_relevance"), ".1e"), row.get("error", "")])
            print(f"  {arch} {name}: {row}", file=sys.stderr, flush=True)
    tf32 = {k: v["tf32_relevance"] for k, v in results.items() if "tf32_relevance" in v}
    text = table(["arch", "method", "map rel. L2", "relevance rel. L2", "fp16 relevance rel. L2", "error"], rows)
    text += ("\n\nDevice against CPU, both fp32 (TF32 off, onnxlrp's default); fp16: the device's fp16 pass "
             "against the CPU's fp32. Largest of 2 images.")
    if tf32:
        text += f" With TF32 on: {', '.join(f'{k} {v:.1e}' for k, v in tf32.items())}."
    return results, text


def throughput(ctx) -> tuple[dict, str]:
    arch = ctx.archs[-1]
    folded = exported(arch, ctx.size, keep_batchnorm=False)
    common = dict(device=ctx.device, size=ctx.size, batches=ctx.batches, warmup=2, repeats=ctx.repeats,
                  arch=arch, onnx=folded, cache=str(ctx.cache))
    # the sweep builds each shape's cuDNN choice once; exhaustive search on ~150 convolutions
    # at 9 batch sizes would take minutes (the options section compares the two at one batch)
    common["cuda_options"] = {"cudnn_conv_algo_search": "HEURISTIC"}
    configs = []
    for precision in ctx.precisions:
        configs.append(("ORT forward", dict(what="ort", precision=precision, preset="")))
        for preset in ("epsilon-plus-flat", "epsilon"):
            configs.append((f"onnxlrp {preset}", dict(what="onnxlrp", precision=precision, preset=preset)))
            configs.append((f"onnxlrp {preset}, on-device", dict(what="session", precision=precision, preset=preset)))
        if not ctx.skip_zennit:
            configs.append(("Zennit epsilon-plus-flat", dict(what="zennit", precision=precision,
                                                              preset="epsilon-plus-flat")))
    results, rows = {}, []
    for index, (label, config) in enumerate(configs):
        share = ctx.clock.left() / (len(configs) - index)
        result = run_worker({**common, **config}, timeout=max(share * 2, 5) if index < len(configs) - 1 else share)
        results[f"{label} {config['precision']}"] = result
        print(f"  {label} {config['precision']}: {json.dumps(result)[:300]}", file=sys.stderr, flush=True)
    for key, result in results.items():
        precision = key.rsplit(" ", 1)[1]
        forward = results.get(f"ORT forward {precision}", {}).get("batches", {})
        if "error" in result:
            rows.append([key, "", "", "", "", "", result["error"]])
            continue
        for batch, r in result["batches"].items():
            if "error" in r:
                rows.append([key, batch, "", "", "", "", r["error"]])
                continue
            f = forward.get(batch, {}).get("seconds")
            preset = next((p for p in FLOOR if p in key and "onnxlrp" in key), None)
            floor = r["seconds"] / (FLOOR[preset] * f) if preset and f else None
            rows.append([key, batch, f"{r['images_per_s']:.0f}", fmt(f and r["seconds"] / f, ".2f"),
                         fmt(floor, ".2f"), fmt(r["peak_mib"], ".0f"), f"first run {r['first_run_s']:.2f} s"])
    text = table(["configuration", "batch", "images/s", "x forward", "x floor", "peak GPU MiB", "note"], rows)
    text += (f"\n\n{arch} at {ctx.size}x{ctx.size}, seeded random weights and inputs; median of {ctx.repeats} runs "
             "after 2 (the first listed as 'first run'); x forward: seconds over onnxruntime's plain forward "
             "at that batch and precision; x floor: over the convolution floor (3 forward passes for "
             "epsilon-plus-flat, 2 for epsilon). 'on-device': the relevance session alone, inputs and outputs "
             "left on the GPU; Zennit's input is on the GPU before the timing and its attributions stay there. "
             "cuDNN algorithm search: heuristic; TF32 off.")
    results["best"] = best_batch(results, ctx)
    return results, text


def best_batch(results: dict, ctx) -> dict:
    """The batch with the most images/s of the fp16 (else fp32) epsilon-plus-flat explain."""
    for precision in ("fp16", "fp32"):
        batches = results.get(f"onnxlrp epsilon-plus-flat {precision}", {}).get("batches", {})
        good = {int(b): r["images_per_s"] for b, r in batches.items() if "images_per_s" in r}
        if good:
            batch = max(good, key=good.get)
            return {"precision": precision, "batch": batch, "images_per_s": good[batch]}
    return {"precision": ctx.precisions[-1], "batch": ctx.batches[-1], "images_per_s": None}


def profile(ctx) -> tuple[dict, str]:
    """onnxruntime's own profile of the relevance pass: where the time goes, per op type and
    provider, what fell back to the CPU, how many host-device copies."""
    import onnxruntime as ort
    from onnxlrp import Explainer
    from onnxlrp.runtime.session import DISABLED_OPTIMIZERS, providers, run_batched, session_options
    best = ctx.results.get("throughput", {}).get("best") or {}
    precision = best.get("precision", ctx.precisions[-1])
    batch = min(best.get("batch", 64), 64)
    arch = ctx.archs[-1]
    ex = Explainer(exported(arch, ctx.size, keep_batchnorm=False), device=ctx.device, precision=precision)
    options = session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(ctx.out / "ort_profile")
    sess = ort.InferenceSession(ex.compiled.source, options, providers=providers(ctx.device),
                                disabled_optimizers=DISABLED_OPTIMIZERS)
    x = np.random.default_rng(0).standard_normal((batch, 3, ctx.size, ctx.size), dtype=np.float32)
    feeds = {"images": x, "target": np.full(batch, -1, np.int64)}
    for _ in range(3):
        run_batched(sess, feeds, batch)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    runs = 3
    by_op: dict[tuple[str, str], list[float]] = {}
    for e in nodes:
        key = (e["args"].get("op_name", "?"), e["args"].get("provider", "?"))
        by_op.setdefault(key, []).append(e["dur"] / 1e3 / runs)
    total = sum(sum(v) for v in by_op.values())
    ranked = sorted(by_op.items(), key=lambda kv: -sum(kv[1]))
    placed = sorted({(e["args"].get("op_name"), e["name"].rsplit("_kernel_time", 1)[0]) for e in nodes
                     if e["args"].get("provider") == "CPUExecutionProvider"})
    result = {"precision": precision, "batch": batch, "total_ms": total,
              "ops": [{"op": op, "provider": p, "ms": sum(v), "count": len(v) // runs} for (op, p), v in ranked],
              "cpu_nodes": [list(p) for p in placed]}
    rows = [[op, p.replace("ExecutionProvider", ""), len(v) // runs, f"{sum(v):.2f}", f"{100 * sum(v) / total:.1f}"]
            for (op, p), v in ranked[:25]]
    text = (f"{arch}, {precision}, batch {batch}: {total:.1f} ms of kernel time per relevance pass "
            f"(mean of {runs} runs).\n\n" + table(["op", "provider", "nodes", "ms", "%"], rows))
    if ctx.device != "cpu":
        text += (f"\n\nNodes on the CPU provider ({len(placed)}): "
                 + (", ".join(f"{name} ({op})" for op, name in placed[:40]) or "none"))
    (ctx.out / "profile.md").write_text(f"# onnxruntime profile of the relevance pass\n\n{text}\n")
    return result, text


def provider_options(ctx) -> tuple[dict, str]:
    best = ctx.results.get("throughput", {}).get("best") or {}
    batch = best.get("batch", 64)
    arch = ctx.archs[-1]
    common = dict(device=ctx.device, size=ctx.size, batches=[batch], warmup=2, repeats=ctx.repeats, arch=arch,
                  onnx=exported(arch, ctx.size, keep_batchnorm=False), cache=str(ctx.cache),
                  what="onnxlrp", preset="epsilon-plus-flat")
    variants = [
        ("fp16", "exhaustive search (onnxruntime's default)", {"cudnn_conv_algo_search": "EXHAUSTIVE"}),
        ("fp16", "heuristic search", {"cudnn_conv_algo_search": "HEURISTIC"}),
        ("fp16", "heuristic, NHWC", {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "1"}),
        ("fp16", "exhaustive, NHWC", {"cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": "1"}),
        ("fp32", "TF32 off (onnxlrp's default)", {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}),
        ("fp32", "TF32 on", {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "1"}),
    ]
    results, rows = {}, []
    for index, (precision, label, options) in enumerate(variants):
        if precision not in ctx.precisions:
            continue
        share = ctx.clock.left() / (len(variants) - index)
        r = run_worker({**common, "precision": precision, "cuda_options": options}, timeout=share)
        results[f"{precision} {label}"] = r
        b = r.get("batches", {}).get(str(batch), {})
        rows.append([precision, label, fmt(b.get("images_per_s"), ".0f"), fmt(b.get("first_run_s"), ".2f"),
                     fmt(b.get("peak_mib"), ".0f"), r.get("error") or b.get("error", "")])
    text = table(["precision", "CUDA provider settings", "images/s", "first run s", "peak GPU MiB", "error"], rows)
    text += f"\n\nonnxlrp explain, epsilon-plus-flat, {arch}, batch {batch}."
    if ctx.device != "cuda":
        text += " On the CPU these settings do not apply (a rehearsal of the code)."
    return results, text


def tensorrt(ctx) -> tuple[dict, str]:
    import onnxruntime as ort
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return {"available": False}, "this onnxruntime build has no TensorRT provider"
    path = exported(ctx.archs[-1], ctx.size, keep_batchnorm=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        sess = ort.InferenceSession(path, options, providers=["TensorrtExecutionProvider"])
        used = sess.get_providers()
    except Exception as exc:
        return {"available": False, "error": str(exc).splitlines()[0][:300]}, f"does not start: {str(exc).splitlines()[0][:300]}"
    ok = used[0] == "TensorrtExecutionProvider"
    return {"available": ok, "providers": used}, ("starts" if ok else f"falls back to {used[0]} (TensorRT libraries missing)")


SECTIONS = {"environment": environment, "correctness": correctness, "throughput": throughput,
            "profile": profile, "options": provider_options, "tensorrt": tensorrt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=False)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 480)")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), help="these sections (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="a rehearsal: resnet18 at 64x64, batches 1 and 2, four methods")
    p.add_argument("--skip-zennit", action="store_true")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "fp16"],
                   help="default: fp32 and fp16 on cuda, fp32 on the CPU")
    p.add_argument("--models", type=Path, help="where exported models are kept (default benchmarks/.cache)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.models:
        bench.CACHE = args.models
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.out is None:
        p.error("--out is required")
    ctx = argparse.Namespace(
        device=args.device, out=args.out, clock=Clock(args.budget), results={}, skip_zennit=args.skip_zennit,
        archs=["resnet18"] if args.quick else ["resnet18", "resnet50"], size=64 if args.quick else 224,
        batches=[1, 2] if args.quick else [1, 8, 32, 64, 128, 256], repeats=2 if args.quick else 5,
        methods=("epsilon-plus-flat", "paper-iv", "gradient", "grad-cam") if args.quick else CORRECTNESS_METHODS,
        precisions=args.precisions or (["fp32", "fp16"] if args.device == "cuda" else ["fp32"]),
        cache=bench.CACHE / "explainers")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["ONNXLRP_CACHE"] = str(ctx.cache)  # compiled explainers, shared by the CPU and GPU runs
    if args.device == "cuda":
        ctx.cuda = start_cuda()
    report = ["# GPU check (benchmarks/gpu/check.py)\n"]
    for name in args.only or list(SECTIONS):
        ctx.clock.start(name)
        print(f"{name} ({ctx.clock.left():.0f} s)", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            result, text = SECTIONS[name](ctx)
        except Exception as exc:  # one broken section must not cost the others their results
            result, text = {"error": f"{type(exc).__name__}: {exc}"}, f"failed: {type(exc).__name__}: {exc}"
        ctx.results[name] = result
        report.append(f"## {name} ({time.monotonic() - started:.0f} s)\n\n{text}\n")
        (args.out / "results.json").write_text(json.dumps(ctx.results, indent=1, default=str))
        (args.out / "results.md").write_text("\n".join(report))
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
