"""Benchmark onnxlrp against a plain onnxruntime forward pass and against Zennit.

    . .venv/bin/activate
    python benchmarks/bench.py                                   # resnet50, 224x224, batch 1 and 8
    python benchmarks/bench.py --arch resnet18 resnet50 --batch 8 --presets epsilon-plus-flat epsilon-gamma-box
    python benchmarks/bench.py --device cuda                     # onnxlrp and ORT forward on CUDA

Models are torchvision ResNets with seeded random weights (models/export_torchvision.py:
build(arch, seed=0)), exported once to ONNX with BatchNorm folded and cached in
benchmarks/.cache/ (preset "paper" gets an export with BatchNorm kept, as it needs).
The input is a seeded random float32 batch [N, 3, size, size].

Every measurement runs in its own fresh subprocess (this script with --worker), which
does its setup, 2 warm-up runs (--warmup), then --repeats timed runs; the median wall time
is reported. The script also notes how much CPU other processes took during each
measurement (from /proc/stat) and reruns a disturbed one up to --retries times, keeping the
quietest; on a small shared machine, a busy neighbour slows torch/Zennit (OpenMP) far more
than onnxruntime. Columns:

    ORT fwd s      onnxruntime.InferenceSession on the exported .onnx, default threads
                   and graph optimisations: one forward pass of the batch
    onnxlrp s      Explainer(...).explain(x, batch_size=N); the Explainer is set up outside the
                   timing, as a later CLI call finds it: an earlier process built it into a
                   fresh private on-disk cache; both set-up times are listed below the table
    Zennit s       zennit.attribution.Gradient with the preset's composite and
                   ResNetCanonizer on the same torch model (registered outside the timing),
                   attr_output = one-hot(top-1) * top-1 logit, float32,
                   torch.set_num_threads(os.cpu_count()); n/a for presets Zennit lacks
    torch fwd s    plain torch forward (inference_mode), same threads, for context
    lrp/ORT        onnxlrp s / ORT fwd s: the cost of an explanation in forward passes
    Zennit/lrp     Zennit s / onnxlrp s: > 1 means onnxlrp is faster
    ... MiB        "peak (+rise)": peak resident memory (RSS) of that measurement's process
                   during warm-up and timed runs, in MiB: the high-water mark (VmHWM) is reset
                   through /proc/self/clear_refs after imports and setup and read afterwards.
                   It is the whole process (interpreter, libraries, weights, what setup left
                   behind); the bracket is its rise above the RSS right after setup, i.e.
                   roughly the working memory of the runs. Host memory only, also with
                   --device cuda.

Presets map to Zennit composites as: epsilon-plus-flat -> EpsilonPlusFlat,
epsilon-gamma-box -> EpsilonGammaBox(low=-3, high=3) (the Explainer gets low=-3, high=3
too), epsilon-alpha2-beta1 -> EpsilonAlpha2Beta1. onnxlrp runs with split="proportional"
(the signed z-rule Zennit's canonizer applies to the residual sums) and bias=True.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
PRESETS = ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1", "epsilon", "paper")
ZENNIT = {"epsilon-plus-flat": ("EpsilonPlusFlat", {}),
          "epsilon-gamma-box": ("EpsilonGammaBox", {"low": -3.0, "high": 3.0}),
          "epsilon-alpha2-beta1": ("EpsilonAlpha2Beta1", {})}
QUIET = 0.1  # cores other processes may use during a measurement before it counts as disturbed
EXPLAINER_BOUNDS = {"epsilon-gamma-box": {"low": -3.0, "high": 3.0}}


# ---------------------------------------------------------------- worker side (one measurement)

def median_time(fn, warmup: int, repeats: int, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds all processes have used, CPU seconds this process has used) so far."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib(reset_ok: bool) -> float:
    if reset_ok:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole life, setup included


def ort_session(path: str, device: str):
    import onnxruntime as ort
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(path, options, providers=providers)
    if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit("--device cuda: onnxruntime's CUDAExecutionProvider could not start "
                         "(no GPU, or no onnxruntime-gpu with its CUDA/cuDNN libraries)")
    return sess


def torch_model(arch: str, device: str):
    import torch
    sys.path.insert(0, str(ROOT))
    from models.export_torchvision import build
    torch.set_num_threads(os.cpu_count())
    return build(arch, seed=0).to(device), torch


def zennit_attributor(model, preset: str):
    """Zennit's Gradient attributor with the preset's composite and ResNetCanonizer, registered
    once (untimed); attr_output = one-hot(top-1) * top-1 logit."""
    import torch
    import zennit.composites
    from zennit.attribution import Gradient
    from zennit.torchvision import ResNetCanonizer
    cls, kwargs = ZENNIT[preset]
    composite = getattr(zennit.composites, cls)(canonizers=[ResNetCanonizer()], **kwargs)

    def top1(logits):
        logits = logits.detach()
        idx = logits.argmax(1, keepdim=True)
        return torch.zeros_like(logits).scatter_(1, idx, logits.gather(1, idx))

    attributor = Gradient(model=model, composite=composite, attr_output=top1)
    attributor.__enter__()
    return attributor


def worker(job: dict) -> dict:
    """Set up, reset the memory high-water mark, time. Returns seconds and MiB."""
    n, size, device = job["batch"], job["size"], job["device"]
    x = np.random.default_rng(0).standard_normal((n, 3, size, size), dtype=np.float32)
    out, sync = {}, (lambda: None)
    if job["what"] == "ort":
        sess = ort_session(job["onnx"], device)
        name = sess.get_inputs()[0].name
        fn = lambda: sess.run(None, {name: x})
    elif job["what"] in ("build", "onnxlrp"):
        from onnxlrp import Explainer
        os.environ["ONNXLRP_CACHE"] = job["cache"]  # private: cold for "build", filled by it for "onnxlrp"
        options = dict(preset=job["preset"], split="proportional", bias=True, device=device,
                       **EXPLAINER_BOUNDS.get(job["preset"], {}))
        start = time.perf_counter()
        ex = Explainer(job["onnx"], **options)
        out["setup_s"] = time.perf_counter() - start
        if job["what"] == "build":  # nothing to time: the next process finds it in the cache
            return out
        fn = lambda: ex.explain(x, batch_size=n)
    else:  # torch or zennit
        model, torch = torch_model(job["arch"], job["torch_device"])
        xt = torch.from_numpy(x).to(job["torch_device"])
        if job["torch_device"] == "cuda":
            sync = torch.cuda.synchronize
        if job["what"] == "torch":
            def fn():
                with torch.inference_mode():
                    model(xt)
        else:
            attributor = zennit_attributor(model, job["preset"])
            fn = lambda: attributor(xt)
    out["before_mib"] = current_rss_mib()
    reset_ok = reset_peak_rss()
    (all0, own0), start = busy_cpu_s(), time.perf_counter()
    out["seconds"] = median_time(fn, job["warmup"], job["repeats"], sync)
    (all1, own1), wall = busy_cpu_s(), time.perf_counter() - start
    out["others_cores"] = max(0.0, (all1 - all0) - (own1 - own0)) / wall  # CPU taken by other processes
    out["peak_mib"] = peak_rss_mib(reset_ok)
    out["peak_method"] = "VmHWM after reset" if reset_ok else "ru_maxrss (whole process)"
    return out


# ---------------------------------------------------------------- parent side

def run_job(retries: int, **job) -> dict:
    """One measurement in a fresh process; retried (after a pause) while other processes load the CPU."""
    best = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(30)
        print(f"  {job['what']:8} {job['arch']} batch {job['batch']} {job.get('preset', '')}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"worker {job['what']} failed:\n{proc.stderr.strip()}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        best = min(best or result, result, key=lambda r: r.get("others_cores", 0))
        if best.get("others_cores", 0) <= QUIET:
            break
    return best


def exported(arch: str, size: int, keep_batchnorm: bool) -> str:
    path = CACHE / f"{arch}_seed0_{size}{'_bn' if keep_batchnorm else ''}.onnx"
    if not path.exists():
        import torch
        sys.path.insert(0, str(ROOT))
        from models.export_torchvision import build, export
        print(f"exporting {path.name}", file=sys.stderr, flush=True)
        with torch.no_grad():
            export(build(arch, seed=0), path, size=size, keep_batchnorm=keep_batchnorm)
    return str(path)


def check_cuda() -> str:
    """Fail early without a CUDA provider; returns the device torch/Zennit run on. (onnxruntime-gpu
    lists the provider even without a GPU: ort_session then fails with a clear message.)"""
    import onnxruntime as ort
    import torch
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("--device cuda: this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine(device: str, torch_device: str) -> str:
    import onnxruntime
    import torch
    from importlib.metadata import version
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return (f"Machine: {cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
            f"zennit {version('zennit')}, onnxlrp {version('onnxlrp')}; "
            f"onnxlrp/ORT device {device}, torch/Zennit device {torch_device}")


def fmt(value, spec=".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def mem(result: dict) -> str:
    """'peak (+growth)': peak RSS, and how far it rose above the RSS right after setup."""
    return "n/a" if not result else f"{result['peak_mib']:.0f} (+{result['peak_mib'] - result['before_mib']:.0f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["resnet50"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--presets", nargs="+", default=["epsilon-plus-flat"], choices=PRESETS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--retries", type=int, default=2, help="reruns of a measurement disturbed by other processes")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="for onnxlrp and the ORT forward")
    p.add_argument("--skip-zennit", action="store_true",
                   help="leave Zennit out (resnet50 at batch 32 needs about 25 GB with it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    torch_device = check_cuda() if args.device == "cuda" else "cpu"
    common = dict(size=args.size, device=args.device, torch_device=torch_device,
                  warmup=args.warmup, repeats=args.repeats, retries=args.retries)
    rows, builds, loads, methods, results = [], {}, {}, set(), []
    scratch = tempfile.mkdtemp(prefix="onnxlrp-bench-")  # private explainer caches, cold at the start
    caches = {(arch, preset): os.path.join(scratch, f"{arch}-{preset}") for arch in args.arch for preset in args.presets}
    for arch in args.arch:
        folded = exported(arch, args.size, keep_batchnorm=False)
        for batch in args.batch:
            ort = run_job(what="ort", arch=arch, batch=batch, onnx=folded, **common)
            fwd = run_job(what="torch", arch=arch, batch=batch, **common)
            for preset in args.presets:
                path = exported(arch, args.size, keep_batchnorm=True) if preset == "paper" else folded
                job = dict(arch=arch, batch=batch, preset=preset, onnx=path, cache=caches[arch, preset], **common)
                if (arch, preset) not in builds:  # a first CLI call: builds the explainer, fills the cache
                    builds[arch, preset] = run_job(what="build", **job)["setup_s"]
                lrp = run_job(what="onnxlrp", **job)  # a later call, as it finds the cache
                loads.setdefault((arch, preset), lrp["setup_s"])
                zen = {}
                if preset in ZENNIT and not args.skip_zennit:
                    zen = run_job(what="zennit", arch=arch, batch=batch, preset=preset, **common)
                results += [r for r in (ort, fwd, lrp, zen) if r]
                methods.update(r["peak_method"] for r in results)
                z = zen.get("seconds")
                rows.append([arch, batch, preset, fmt(ort["seconds"]), fmt(lrp["seconds"]), fmt(z),
                             fmt(fwd["seconds"]), fmt(lrp["seconds"] / ort["seconds"], ".1f"),
                             fmt(z and z / lrp["seconds"], ".2f"), mem(ort), mem(lrp), mem(zen), mem(fwd)])

    head = ["arch", "batch", "preset", "ORT fwd s", "onnxlrp s", "Zennit s", "torch fwd s",
            "lrp/ORT", "Zennit/lrp", "ORT MiB", "onnxlrp MiB", "Zennit MiB", "torch MiB"]
    print(machine(args.device, torch_device))
    print(f"Input {args.size}x{args.size}, random seeded weights; median of {args.repeats} runs after "
          f"{args.warmup} warm-up; each measurement in a fresh process; MiB = peak RSS of that process "
          f"over warm-up and timed runs ({', '.join(sorted(methods))}), in brackets its rise above the "
          f"RSS after imports and setup.\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    others = max(r["others_cores"] for r in results)
    print(f"\nOther processes used on average up to {others:.2f} of {os.cpu_count()} cores during a measurement"
          f"{' -- timings are disturbed, rerun on a quiet machine' if others > QUIET else ''}.")
    print("\nExplainer set-up: first build (read, canonicalise, build the relevance graph, store it in the "
          "cache, start the session) / later runs (load from the cache, start the session):")
    for (arch, preset), build in builds.items():
        print(f"  {arch} {preset}: {build:.2f} s / {loads[arch, preset]:.2f} s")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
