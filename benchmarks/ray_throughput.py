"""Throughput of onnxlrp on Ray Data against one process: images per second.

    python benchmarks/ray_throughput.py                       # the demo model on examples/shapes (120 images)
    python benchmarks/ray_throughput.py --model M.onnx --images DIR --repeats 3

Single process: Explainer.explain_files over all images (decoding included), the explainer
already compiled (a second call). Ray: onnxlrp.distributed.explain_dataset into a fresh
output folder on a local Ray instance started once before the timings, with 1 and 2 actors;
the time includes what a run pays each time (actor start, session, decoding, Parquet writing),
not Ray's own start-up, which is printed apart. Median of --repeats runs each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "demo" / "tiny_resnet.onnx"))
    p.add_argument("--images", default=str(ROOT / "examples" / "shapes"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--actors", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import ray

    from onnxlrp import Explainer
    from onnxlrp.distributed import done_paths, explain_dataset
    from onnxlrp.io.preprocessing import image_files

    files = [str(f) for f in image_files([args.images]) if "masks" not in f.parts]  # not the benchmark's masks
    explainer = Explainer(args.model)
    explainer.explain_files(files[:args.batch_size], batch_size=args.batch_size)  # warm-up
    rows = []

    def timed(run) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    single = timed(lambda: explainer.explain_files(files, batch_size=args.batch_size))
    rows.append(("one process", single))
    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"ray.init: {time.perf_counter() - start:.1f} s ({ray.cluster_resources().get('CPU')} CPUs)")
    for actors in args.actors:
        def run(actors=actors):
            with tempfile.TemporaryDirectory() as folder:
                explain_dataset(files, args.model, output=Path(folder) / "out", batch_size=args.batch_size,
                                concurrency=actors)
                assert len(done_paths(Path(folder) / "out")) == len(files)
        rows.append((f"Ray, {actors} actor(s)", timed(run)))
    ray.shutdown()
    print(f"{len(files)} images, {Path(args.model).name}, batch {args.batch_size}, median of {args.repeats}")
    print(f"{'':22} {'seconds':>8} {'images/s':>9}")
    for name, seconds in rows:
        print(f"{name:22} {seconds:8.2f} {len(files) / seconds:9.1f}")


if __name__ == "__main__":
    main()
