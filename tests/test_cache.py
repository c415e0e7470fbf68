"""The on-disk cache of compiled explainers, several classes per image at once, and how the
relevance pass runs in onnxruntime (IO binding, scheduling)."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from conftest import relative_error
from float32_bounds import apart
from onnxlrp import Explainer


def test_second_explainer_comes_from_the_cache(demo_model, explainer_cache, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copyfile(demo_model, model)
    x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
    first = Explainer(model, preset="epsilon-gamma-box", split="proportional")
    entries = set(explainer_cache.glob("*.onnx"))
    second = Explainer(model, preset="epsilon-gamma-box", split="proportional")
    assert set(explainer_cache.glob("*.onnx")) == entries and second.model_path == first.model_path
    assert second._analysis is None  # nothing was rebuilt
    # bitwise: the stored graph, under the same session options, in one process (the same kernels)
    np.testing.assert_array_equal(second.explain(x).relevance, first.explain(x).relevance)
    assert second.merges == first.merges and second.summary == first.summary
    assert len(second.analysis.merges) == 6  # still there on demand
    Explainer(model, preset="epsilon-gamma-box", split="ratio")  # other options: another entry
    assert len(set(explainer_cache.glob("*.onnx")) - entries) == 1
    changed = onnx.load(str(model))
    changed.doc_string = "another model at the same path"
    onnx.save(changed, str(model))  # other content, same path: another entry
    Explainer(model, preset="epsilon-gamma-box", split="proportional")
    assert len(set(explainer_cache.glob("*.onnx")) - entries) == 2
    uncached = Explainer(model, preset="epsilon-gamma-box", split="proportional", cache=False)
    assert uncached.model_path is None
    # bitwise: a fresh compile is the cached graph node for node, weights byte for byte; same options, one process
    np.testing.assert_array_equal(uncached.explain(x).relevance, first.explain(x).relevance)


def test_top_k_classes_in_one_run(demo_model, tmp_path):
    explainer = Explainer(demo_model)
    x = np.random.RandomState(1).randn(2, 3, 64, 64).astype(np.float32)
    result = explainer.explain(x, top_k=3)
    order = np.argsort(-result.logits[::3], axis=1)[:, :3]
    np.testing.assert_array_equal(result.targets.reshape(2, 3), order)
    singles = np.concatenate([explainer.explain(x[row // 3:row // 3 + 1], target=int(result.targets[row])).relevance
                              for row in range(6)])
    # a batch of 6 rows against batches of 1: onnxruntime may take other kernels, which sum in
    # another order (float32 rounding of both runs)
    assert relative_error(singles, result.relevance) <= apart(demo_model, np.repeat(x, 3, axis=0), result.targets,
                                                              tmp_path)[0]


def test_compiled_explainer_takes_ranks(demo_model, tmp_path):
    """In the saved model, target -r explains the r-th best class."""
    Explainer(demo_model).save(tmp_path / "e.onnx")
    session = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.RandomState(2).randn(1, 3, 64, 64).astype(np.float32)
    logits, targets = session.run(["logits", "targets"], {"images": x, "target": np.array([-2])})
    assert targets[0] == np.argsort(-logits[0])[1]


def test_io_binding_gives_the_same_result(demo_model):
    """The GPU path binds inputs and outputs; on the CPU provider it must agree with plain runs."""
    from onnxlrp.lrp import relevance_graph as rg
    from onnxlrp.runtime.session import run_batched
    explainer = Explainer(demo_model, trace=True)
    x = np.random.RandomState(3).randn(5, 3, 64, 64).astype(np.float32)
    feeds = {rg.INPUT: x, rg.TARGET: np.full(5, -1)}
    plain = run_batched(explainer.session, feeds, 2, io_binding=False)
    bound = run_batched(explainer.session, feeds, 2, io_binding=True)
    assert plain.keys() == bound.keys()
    for name in plain:
        np.testing.assert_array_equal(plain[name], bound[name])  # one session, the same batches: the same kernels


def test_cache_entry_keeps_weights_apart_and_save_is_self_contained(demo_model, tmp_path):
    explainer = Explainer(demo_model, preset="epsilon-plus-flat")
    assert explainer.model_path.with_suffix(".data").is_file()  # onnxruntime then holds one copy
    explainer.save(tmp_path / "e.onnx")
    saved = onnx.load(str(tmp_path / "e.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in saved.graph.initializer)
    x = np.random.RandomState(4).randn(2, 3, 64, 64).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    relevance, = session.run(["relevance"], {"images": x, "target": np.full(2, -1)})
    expected = explainer.explain(x)
    # plain onnxruntime's default session options are not onnxlrp's (Pad fusion on, memory
    # pattern): it may fuse and pick kernels otherwise, float32 rounding of both runs
    assert relative_error(relevance, expected.relevance) <= apart(demo_model, x, expected.targets, tmp_path,
                                                                  preset="epsilon-plus-flat")[0]


def test_modified_forwards_wait_for_the_backward_pass(resnet18, tmp_path):
    """z+ convolutions (W+ x) need only forward tensors; onnxruntime would run them during the
    forward pass and keep their outputs until the backward pass, unless they wait for it."""
    explainer = Explainer(resnet18.folded, preset="epsilon-plus-flat", split="proportional")
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(explainer.model_path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"images": np.ones((1, 3, 64, 64), np.float32), "target": np.full(1, -1)})
    events = json.loads(Path(session.end_profiling()).read_text())
    order = [e["name"][:-len("_kernel_time")] for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    backward_starts = next(i for i, name in enumerate(order) if name.startswith("lrp/output/TopK"))
    convs = [i for i, name in enumerate(order) if name.startswith("lrp/") and "/Conv_" in name]
    assert len(convs) > 19  # one W+ x per z+ conv (19; the stem is flat), and stride-1 transposes
    assert min(convs) > backward_starts


def test_cache_key_is_every_option_that_shapes_the_graph(demo_model, explainer_cache, tmp_path):
    """A preprocessing that shares ImageNet's name but not its statistics moves the z^B box:
    it must not find ImageNet's explainer. The key comes from the whole options object."""
    import pickle

    from onnxlrp import rules as R
    from onnxlrp.options import Options
    from onnxlrp.io.preprocessing import Preprocessing

    model = tmp_path / "model.onnx"
    shutil.copyfile(demo_model, model)
    x = np.random.RandomState(5).randn(2, 3, 64, 64).astype(np.float32)
    imagenet = Explainer(model, preset="epsilon-gamma-box")
    impostor = Preprocessing("imagenet", 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    cached = Explainer(model, preset="epsilon-gamma-box", preprocessing=impostor)
    assert cached.model_path != imagenet.model_path
    fresh = Explainer(model, preset="epsilon-gamma-box", preprocessing=impostor, cache=False)
    np.testing.assert_array_equal(cached.explain(x).relevance, fresh.explain(x).relevance)
    assert np.abs(cached.explain(x).relevance - imagenet.explain(x).relevance).max() > 0

    # Equal options, however spelled, share an entry; rule overrides and their parameters are keyed.
    same = Explainer(model, preset="epsilon-gamma-box", split="ratio", include_identity=True)
    assert same.model_path == imagenet.model_path
    gamma_a = Explainer(model, preset="epsilon-gamma-box", rules={"Conv": R.gamma(0.5)})
    gamma_b = Explainer(model, preset="epsilon-gamma-box", rules={"Conv": R.gamma(0.1)})
    assert len({gamma_a.model_path, gamma_b.model_path, imagenet.model_path}) == 3
    assert Explainer(model, preset="epsilon-gamma-box", rules={"Conv": R.gamma(0.5)}).model_path == gamma_a.model_path
    np.testing.assert_array_equal(gamma_b.explain(x).relevance, Explainer(
        model, preset="epsilon-gamma-box", rules={"Conv": R.gamma(0.1)}, cache=False).explain(x).relevance)

    # The options object travels: it pickles, and its digest survives the trip.
    options = gamma_a.options
    assert pickle.loads(pickle.dumps(options)).digest() == options.digest()
    # A user's modifier is keyed by its code and the values it closes over ...
    scale = 2.0
    custom = R.LinearRule("custom", (R.Group((R.Term("x", lambda w: w * scale, None),)),))
    before = set(explainer_cache.glob("*.onnx"))
    Explainer(model, preset="epsilon-gamma-box", rules={"Conv": custom})
    scale = 3.0  # noqa: F841 -- the lambda's cell changed: a new key
    Explainer(model, preset="epsilon-gamma-box", rules={"Conv": custom})
    assert len(set(explainer_cache.glob("*.onnx")) - before) == 2

    # ... and one that cannot be described (a callable object) means no cache, not a wrong hit.
    class Scale:
        def __call__(self, w):
            return w * 2

    opaque = R.LinearRule("opaque", (R.Group((R.Term("x", Scale(), None),)),))
    assert Options(preset=options.preset, split=options.split, rules=(("Conv", opaque),)).digest() is None
    assert Explainer(model, preset="epsilon-gamma-box", rules={"Conv": opaque}).model_path is None
