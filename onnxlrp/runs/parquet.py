"""ParquetSink: a folder run as Parquet rows, one per image, in a folder of Parquet files.

===================== =====================================================================
path                  the image (absolute path; a Dataset's own "path" values as given)
target                the class explained (int64; top-1)
logits                list<float32>, the model's logits
initial_relevance     float32, the relevance the pass started from
input_relevance       float64, the total relevance at the input
conservation_error    float64, |input - initial| / |initial|
reach                 float64, the share of the initial relevance at the input (NaN: gradients)
taken_<family>        float64, what each family of ops took (lrp.reach.FAMILIES; NaN: gradients)
exploded              bool, relevance exploded (NaN/Inf set to 0, or > 1000x the initial)
heatmap               list<float16>, the channel-summed relevance, flattened (row-major)
heatmap_shape         list<int32>, [H, W]
relevance             with full_relevance=True: list<float32>, the input relevance, flattened
relevance_shape       with full_relevance=True: list<int32>, its shape in the model's layout
===================== =====================================================================

Beside the rows, META (_onnxlrp.json) says what produced them: a rerun into the same folder
(resume=True) skips the images that have a row, and refuses a folder holding results of
another model, options or target. Each file holds whole batches and is written under a
temporary name and renamed (in one process) or by Ray Data block by block (on Ray), so an
interrupted run leaves complete rows to resume from. The same rows in both backends: a lone
image is explained as a pair, so no number depends on how a run was cut into batches.
"""
from __future__ import annotations

import json
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import OutputError, SettingError, first_line
from ..io.files import check_writable, write_atomic
from ..lrp import reach
from .sources import Item

#: Written beside the Parquet files: what produced them, checked on resume. The leading
#: underscore keeps it out of pyarrow's (and Ray's) view of the Parquet dataset.
META = "_onnxlrp.json"
PATH = "path"


def parquet_files(output: Path) -> list[Path]:
    return sorted(p for p in Path(output).rglob("*.parquet") if not p.name.startswith((".", "_")))


def done_paths(output: str | Path) -> set[str]:
    """The image paths that already have a row in the Parquet files under `output`."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for file in parquet_files(Path(output)):
        try:
            done.update(pq.read_table(file, columns=[PATH]).column(PATH).to_pylist())
        except Exception as exc:
            raise OutputError(f"{file}: cannot read Parquet file ({first_line(exc)}); "
                               "delete it to explain its images again") from None
    return done


def read_heatmaps(output: str | Path) -> dict[str, np.ndarray]:
    """The heatmaps under `output`, by image path: float16 [H, W] each."""
    import pyarrow.parquet as pq

    maps: dict[str, np.ndarray] = {}
    for file in parquet_files(Path(output)):
        table = pq.read_table(file, columns=[PATH, "heatmap", "heatmap_shape"])
        for path, heat, shape in zip(*(table.column(c).to_pylist() for c in (PATH, "heatmap", "heatmap_shape"))):
            maps[path] = np.asarray(heat, dtype=np.float16).reshape(shape)
    return maps


def check_meta(output: Path, meta: dict[str, Any], keep: bool) -> None:
    """Results already in `output` must come from the same model and options."""
    file = output / META
    if not keep or not parquet_files(output):
        return
    if not file.is_file():
        raise OutputError(f"{output}: holds Parquet files that onnxlrp did not write ({META} is missing); "
                           "choose another output folder")
    old = json.loads(file.read_text())
    for key in ("model_sha256", "options", "target"):
        if old.get(key) != meta[key]:
            raise OutputError(f"{output}: holds results of another {'model' if key == 'model_sha256' else 'set of options'} "
                               f"({old.get('preset')} on {old.get('model')}); choose another output folder, or resume=False "
                               "to replace them")


def table(paths: Sequence[str], result, n: int, full_relevance: bool):
    """The rows of the first n images of `result` (an Explanation): a pyarrow Table."""
    import pyarrow as pa

    taken = result.taken_shares
    exploded = np.zeros(n, dtype=bool)
    if result.explosion is not None:
        exploded[[i for i in result.explosion.indices if i < n]] = True

    def lists(values: np.ndarray) -> pa.Array:
        flat = np.ascontiguousarray(values).reshape(n, -1)
        offsets = np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1)))

    heat = result.heatmap()[:n].astype(np.float16)
    columns = {
        PATH: pa.array(list(paths), pa.string()),
        "target": pa.array(result.targets[:n].astype(np.int64)),
        "logits": lists(result.logits[:n].astype(np.float32)),
        "initial_relevance": pa.array(result.initial[:n].astype(np.float32)),
        "input_relevance": pa.array(result.input_sum[:n]),
        "conservation_error": pa.array(result.conservation_error[:n].astype(np.float64)),
        # the share of the explained logit at the input, and what each family of ops took
        # (lrp.reach; NaN for gradients, which do not conserve)
        "reach": pa.array(result.reach[:n] if taken is not None else np.full(n, np.nan)),
        **{f"taken_{family}": pa.array(taken[:n, k] if taken is not None else np.full(n, np.nan))
           for k, family in enumerate(reach.FAMILIES)},
        "exploded": pa.array(exploded),
        "heatmap": lists(heat),
        "heatmap_shape": lists(np.tile(np.asarray(heat.shape[1:], np.int32), (n, 1))),
    }
    if full_relevance:
        relevance = result.relevance[:n].astype(np.float32)
        columns["relevance"] = lists(relevance)
        columns["relevance_shape"] = lists(np.tile(np.asarray(relevance.shape[1:], np.int32), (n, 1)))
    return pa.table(columns)


@dataclass(frozen=True)
class ParquetSink:
    """One Parquet row per image in the folder `output` (the columns above). resume: skip the
    images that already have a row there (False: replace what is there)."""

    output: Path
    full_relevance: bool = False
    resume: bool = True
    meta: dict | None = field(default=None, compare=False)  # set by opened()
    done_keys: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    #: rows hold absolute paths (a run from another folder finds them again)
    absolute = True
    pair_lone = True
    #: rows hold no concept maps (FileSink(concepts=K) writes them)
    concepts = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))

    def plan(self, count: int, top_k: int | None) -> ParquetSink:
        if top_k:
            raise SettingError("a Parquet row holds one explanation per image: top_k cannot be written there")
        return self

    def check(self, items: Sequence[Item]) -> None:
        if self.output.exists() and not self.output.is_dir():
            raise OutputError(f"{self.output}: not a folder")
        check_writable([self.output / META])

    def opened(self, meta: dict[str, Any]) -> ParquetSink:
        """The sink for a run that `meta` describes (model, its digest, options, target): rows
        already there must be of the same, and are skipped on resume."""
        check_meta(self.output, meta, self.resume)
        done = frozenset(done_paths(self.output)) if self.resume and self.output.is_dir() else frozenset()
        return replace(self, meta=meta, done_keys=done)

    @property
    def resumes(self) -> bool:
        return self.resume

    def done(self, item: Item) -> bool:
        return item.key in self.done_keys

    def write_meta(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        write_atomic(self.output / META, lambda tmp: Path(tmp).write_text(json.dumps(self.meta, indent=1)))

    @contextmanager
    def writing(self) -> Iterator[_Rows]:
        """In one process: a file per batch, named by this run (a rerun never overwrites one)."""
        if not self.resume:
            for file in parquet_files(self.output) if self.output.is_dir() else []:
                file.unlink()
        # Before the run (an interrupted run leaves rows to resume from) and after it.
        self.write_meta()
        yield _Rows(self, uuid.uuid4().hex[:16])
        self.write_meta()


@dataclass
class _Rows:
    sink: ParquetSink
    run: str
    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def tasks(self, items: Sequence[Item], pixels: np.ndarray, result) -> list[Callable[[], list[tuple[str, ...]]]]:
        """One task: the batch's rows, one file."""
        with self.lock:
            path = self.sink.output / f"{self.run}_{self.count:06d}.parquet"
            self.count += 1
        return [lambda: self._write(path, items, result)]

    def _write(self, path: Path, items: Sequence[Item], result) -> list[tuple[str, ...]]:
        import pyarrow.parquet as pq

        rows = table([item.key for item in items], result, len(items), self.sink.full_relevance)
        write_atomic(path, lambda tmp: pq.write_table(rows, tmp))
        return [(str(path),)] * len(items)
