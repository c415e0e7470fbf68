"""Property-based tests on random residual networks (hypothesis).

For a ReLU network without biases, LRP-0 (epsilon = 0 everywhere, MaxPool winner-take-all,
the proportional split at merges) equals gradient x input: an independent reference
computed by torch autograd. This pins down every transpose emitter (conv with any
stride, padding, dilation and groups; average, max and global pooling; dense) and the
relevance bookkeeping over fan-outs and merges.
"""
import numpy as np
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch import nn

import float32_bounds
from onnxlrp import Explainer, Split
from onnxlrp import rules as R
import pytest

pytestmark = pytest.mark.slow  # the reference tier: pytest -m "not slow" leaves it out

LRP0 = R.epsilon(0.0)
LRP0_RULES = {op: LRP0 for op in ("Conv", "Gemm", "AveragePool", "GlobalAveragePool")}


class Block(nn.Module):
    def __init__(self, channels, out, kernel, stride, dilation, groups, skip):
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.conv1 = nn.Conv2d(channels, out, kernel, stride, pad, dilation, groups=groups, bias=False)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.skip = skip
        if skip == "projection":
            self.shortcut = nn.Conv2d(channels, out, 1, stride, bias=False)
        elif skip == "pool":
            self.shortcut = nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity(),
                                          nn.Conv2d(channels, out, 1, bias=False))

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        skip = x if self.skip == "identity" else self.shortcut(x)
        if h.shape != skip.shape:  # torch would broadcast; no real ResNet does
            reject()
        return torch.relu(h + skip)


@st.composite
def networks(draw):
    channels = draw(st.sampled_from([4, 6]))
    layers = [nn.Conv2d(3, channels, draw(st.sampled_from([3, 5])), padding=draw(st.integers(0, 2)), bias=False), nn.ReLU()]
    pool = draw(st.sampled_from(["none", "max", "avg"]))
    if pool == "max":
        layers.append(nn.MaxPool2d(draw(st.sampled_from([2, 3])), 2, padding=draw(st.integers(0, 1))))
    elif pool == "avg":
        layers.append(nn.AvgPool2d(draw(st.sampled_from([2, 3])), draw(st.sampled_from([1, 2])), padding=draw(st.integers(0, 1)),
                                   ceil_mode=draw(st.booleans()), count_include_pad=draw(st.booleans())))
    for _ in range(draw(st.integers(1, 3))):
        stride = draw(st.sampled_from([1, 2]))
        out = draw(st.sampled_from([channels, 2 * channels]))
        groups = draw(st.sampled_from([1, 2]))
        skip = "identity" if (stride == 1 and out == channels and draw(st.booleans())) else draw(st.sampled_from(["projection", "pool"]))
        layers.append(Block(channels, out, draw(st.sampled_from([1, 3])), stride, draw(st.sampled_from([1, 2])), groups, skip))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5, bias=False)]
    size = draw(st.integers(12, 20))
    return nn.Sequential(*layers).eval(), size, draw(st.integers(0, 2**16))


def exported(model, size, path):
    torch.onnx.export(model, torch.randn(1, 3, size, size), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return path


def prepared(net, folder):
    """Seeded weights, the exported model and two input images."""
    model, size, seed = net
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    x = np.random.RandomState(seed).randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
        model(torch.from_numpy(x))  # rejects networks whose merges would broadcast
    return model, exported(model, size, folder / "net.onnx"), x


def gradient_times_input(model, x):
    inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    logits = model.double()(inputs)
    target = logits.argmax(1)
    selected = logits[torch.arange(len(x)), target]
    (grad,) = torch.autograd.grad(selected.sum(), inputs)
    model.float()
    return (inputs * grad).detach().numpy(), target.numpy()


def merge_condition(model, x) -> float:
    """max over merge elements of (|h_s| + |h_m|) / |h_s + h_m|, in float64: how much the
    proportional split, which divides by y = h_s + h_m, amplifies rounding in h_s and h_m."""
    worst = [1.0]

    def hook(block, inputs, output):
        h = block.conv2(torch.relu(block.conv1(inputs[0])))
        skip = inputs[0] if block.skip == "identity" else block.shortcut(inputs[0])
        ratio = (h.abs() + skip.abs()) / (h + skip).abs()
        worst.append(float(ratio[torch.isfinite(ratio)].max()) if torch.isfinite(ratio).any() else 1.0)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Block)]
    with torch.no_grad():
        model.double()(torch.tensor(x, dtype=torch.float64))
    model.float()
    for handle in handles:
        handle.remove()
    return max(worst)


# derandomize: the same 150 networks on every run. The bound below covers merges that nearly
# cancel; a ReLU input within float32 rounding of 0 (a kink) is not covered, and a fresh random
# search could meet one.
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(net=networks())
def test_lrp0_equals_gradient_times_input(net, tmp_path):
    model, path, x = prepared(net, tmp_path)
    # LRP-0 also at merges: the proportional split without a stabiliser
    result = Explainer(path, preset="epsilon", rules=LRP0_RULES, split=Split("proportional", stabilizer=0.0)).explain(x)
    reference, targets = gradient_times_input(model, x)
    np.testing.assert_array_equal(result.targets, targets)
    scale = np.linalg.norm(reference)
    if scale == 0:  # a network whose activations all die: nothing to attribute
        assert not result.relevance.any()
        return

    def run(perturbed):
        relevance, perturbed_targets = gradient_times_input(perturbed, x)
        np.testing.assert_array_equal(perturbed_targets, targets)
        return (relevance,)

    # this network's own sensitivity to float32-sized weight noise, in float64 (float32_bounds.py);
    # plus what the reference does not do and LRP-0 does: divide by y = h_s + h_m at merges. h_s
    # and h_m carry float32 errors of about sqrt(fan-in) u of their size, and the split's shares
    # amplify them by (|h_s| + |h_m|) / |y| (seen: 1.8e5 where y nearly cancels, error 1.2e-3).
    (bound,) = float32_bounds.bounds(run, model, [reference])
    fan_in = max(float32_bounds.fan_ins(model))
    bound += np.sqrt(fan_in) * float32_bounds.U * merge_condition(model, x)
    error = np.linalg.norm(result.relevance - reference) / scale
    assert error <= bound, (error, bound)


ZPLUS_RULES = {"Conv": R.zplus(), "Gemm": R.zplus(), "AveragePool": R.norm(), "GlobalAveragePool": R.norm()}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(net=networks(), split=st.sampled_from(["symmetric", "ratio"]))
def test_zplus_never_creates_or_negates_relevance(net, split, tmp_path):
    """z+ everywhere with a ratio or symmetric split: relevance keeps the sign of the initial
    relevance (the target logit), is never created (z+ may only absorb what a split sends
    where no positive contribution exists), and every merge splits exactly."""
    model, path, x = prepared(net, tmp_path)
    result = Explainer(path, preset="epsilon", rules=ZPLUS_RULES, split=split).explain(x)
    sign = np.sign(result.initial).reshape(-1, 1, 1, 1)
    # exact: products and quotients of numbers of one sign; rounding never flips a sign
    assert (result.relevance * sign).min() >= 0
    # In exact arithmetic |input sum| <= |initial|. In float32 every element is off by at most
    # `chain` (relative: sums of one sign all the way down), and so is their total.
    chain = float32_bounds.one_sign_rtol(model, x)
    assert np.all(np.abs(result.input_sum) <= np.abs(result.initial) * (1 + chain))
    # Merge totals are float32 sums of up to `terms` elements of one sign, each within sum_rtol;
    # R_skip + R_main = R per element up to the split's 3 roundings.
    terms = max(int(np.prod(shape[1:])) for shape in merge_shapes(model, x))
    sums = result.merge_sums.astype(np.float64)
    np.testing.assert_allclose(sums[..., 1] + sums[..., 2], sums[..., 0], rtol=2 * float32_bounds.sum_rtol(terms) + 3 * float32_bounds.U)
    assert np.all(np.abs(sums[..., 0]) <= np.abs(result.initial[:, None]) * (1 + chain + float32_bounds.sum_rtol(terms)))


def merge_shapes(model, x):
    """Output shapes of the residual merges (each Block's Add)."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for m in model.modules() if isinstance(m, Block)]
    with torch.no_grad():
        model(torch.as_tensor(x, dtype=next(model.parameters()).dtype))
    for hook in hooks:
        hook.remove()
    return shapes
