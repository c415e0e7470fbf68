"""Independent plain-PyTorch reference of the LRP method of Otsuki et al.,
"Layer-Wise Relevance Propagation with Conservation Property for ResNet"
(ECCV 2024), used by the tests to check onnxlrp's `paper` preset.

It follows the project brief's paper-method.md, sections 1 (Relevance Splitting at a
residual merge) and 2 (per-layer rules of the published implementation), and
was written without looking at onnxlrp's code.  It works directly on a
torchvision ResNet (BasicBlock or Bottleneck) in eval mode with its BatchNorm
layers NOT folded, walking stem -> layer1..layer4 -> avgpool -> fc block by
block.  Everything is computed in float64 on a deep copy of the model.
A model whose BatchNorms were fused into their convs and replaced by nn.Identity
(as an exporter folds them) runs the same walk: the BN steps pass unchanged.

Rules (eps = 1e-5 by default):
  * Conv (incl. downsample[0]) and the final Linear: z+ rule,
    z = conv(a, W+) + eps (bias dropped), R_in = a * conv^T(R / z).
  * Stem conv: the same with a replaced by ones (zero padding excluded).
  * BatchNorm, ReLU: relevance passes unchanged (BN never folded).
  * Stem MaxPool: replaced, for relevance only, by a 2x2 / stride-2 average
    pool: R_i = a_i R_j / (sum_window a + 4 eps).
  * Global average pool: R_i = a_i R_c / (sum_i a_i + n eps).
  * Residual merge y = h_s + h_m: split="ratio" (|h_s|, |h_m| proportions,
    1/2 each where both are 0) or "symmetric" (R/2 each); with
    include_identity=False identity skips get R_s = 0.
Initial relevance: softmax probability of the top-1 class, other classes 0.
The returned input relevance is [N, 3, H, W] (not summed over channels).
"""

import copy

import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck


# ---------------------------------------------------------------- basic rules

def _zplus_conv(a, conv, R, eps):
    """z+ rule through a Conv2d (bias ignored): R_in = a * conv^T(R / z)."""
    a = a.detach().clone().requires_grad_(True)
    w_pos = conv.weight.detach().clamp(min=0)
    z = F.conv2d(a, w_pos, None, conv.stride, conv.padding, conv.dilation,
                 conv.groups) + eps
    s = (R / z).detach()
    (c,) = torch.autograd.grad(z, a, grad_outputs=s)
    return a.detach() * c


def _zplus_linear(a, fc, R, eps):
    """z+ rule through the final Linear, bias dropped."""
    w_pos = fc.weight.detach().clamp(min=0)          # [classes, features]
    z = a @ w_pos.t() + eps                           # [N, classes]
    s = R / z
    return a * (s @ w_pos)                            # [N, features]


def _avgpool2x2_for_maxpool(a, R, eps):
    """MaxPool relevance via a 2x2 stride-2 unpadded average pool.
    a: maxpool input [N,C,H,W]; R: relevance of maxpool output [N,C,h,w]."""
    window_sum = F.avg_pool2d(a, kernel_size=2, stride=2) * 4.0
    if window_sum.shape != R.shape:
        raise ValueError("2x2 average pool output %s does not match MaxPool "
                         "output %s" % (tuple(window_sum.shape), tuple(R.shape)))
    s = R / (window_sum + 4.0 * eps)
    H2, W2 = 2 * R.shape[2], 2 * R.shape[3]
    s_up = F.interpolate(s, scale_factor=2, mode="nearest")   # each window gets its s
    R_in = torch.zeros_like(a)
    R_in[:, :, :H2, :W2] = a[:, :, :H2, :W2] * s_up
    # Rows/cols beyond 2*h (odd sizes) are in no window and get no relevance.
    return R_in


def _global_avgpool(a, R, eps):
    """a: [N,C,H,W], R: [N,C] -> R_i = a_i R_c / (sum_i a_i + n eps)."""
    n = a.shape[2] * a.shape[3]
    denom = a.sum(dim=(2, 3)) + n * eps
    return a * (R / denom)[:, :, None, None]


def _split(R, h_s, h_m, mode):
    if mode == "symmetric":
        half = R / 2
        return half, half.clone()
    if mode == "ratio":
        abs_s, abs_m = h_s.abs(), h_m.abs()
        tot = abs_s + abs_m
        zero = tot == 0
        safe = torch.where(zero, torch.ones_like(tot), tot)
        frac_s = torch.where(zero, torch.full_like(tot, 0.5), abs_s / safe)
        frac_m = torch.where(zero, torch.full_like(tot, 0.5), abs_m / safe)
        return R * frac_s, R * frac_m
    raise ValueError("split must be 'ratio' or 'symmetric', got %r" % (mode,))


# --------------------------------------------------------------- block walk

def _main_branch(block):
    """(conv, bn) pairs of the main branch in forward order; a ReLU follows
    each pair except the last (the block's final ReLU comes after the Add)."""
    if isinstance(block, Bottleneck):
        return [(block.conv1, block.bn1), (block.conv2, block.bn2),
                (block.conv3, block.bn3)]
    if isinstance(block, BasicBlock):
        return [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    raise TypeError("unsupported block type %s" % type(block).__name__)


def _block_forward(block, x):
    """True forward of one block, recording what the relevance pass needs."""
    pairs = _main_branch(block)
    conv_inputs = []
    h = x
    for k, (conv, bn) in enumerate(pairs):
        conv_inputs.append(h)
        h = bn(conv(h))
        if k < len(pairs) - 1:
            h = block.relu(h)
    h_m = h
    if block.downsample is not None:
        h_s = block.downsample(x)
    else:
        h_s = x
    y = block.relu(h_s + h_m)
    return y, dict(x=x, conv_inputs=conv_inputs, h_m=h_m, h_s=h_s)


def _block_relevance(block, rec, R, split, include_identity, eps, trace):
    """R: relevance of the block output (post final ReLU = the Add output)."""
    projection = block.downsample is not None
    if not projection and not include_identity:
        R_s, R_m = torch.zeros_like(R), R
    else:
        R_s, R_m = _split(R, rec["h_s"], rec["h_m"], split)
    if trace is not None:
        trace["merge_max_abs_err"].append(
            float((R_s + R_m - R).abs().max()))
        trace["merge_rel_err"].append(
            float(((R_s + R_m - R).sum(dim=(1, 2, 3)).abs()
                   / R.sum(dim=(1, 2, 3)).abs().clamp(min=1e-300)).max()))
        trace["merge_sums"].append(   # per image: totals of R, R_s, R_m
            torch.stack([t.sum(dim=(1, 2, 3)) for t in (R, R_s, R_m)], dim=1))

    # main branch: BN and ReLU pass, each conv by z+
    pairs = _main_branch(block)
    Rm = R_m
    for (conv, _bn), a in reversed(list(zip(pairs, rec["conv_inputs"]))):
        Rm = _zplus_conv(a, conv, Rm, eps)

    # skip branch
    if projection:
        conv = block.downsample[0]          # downsample[1] (BN) passes
        Rs = _zplus_conv(rec["x"], conv, R_s, eps)
    else:
        Rs = R_s
    return Rs + Rm


# ------------------------------------------------------------------- driver

def _paper_lrp_impl(model, x, split, include_identity, eps, trace):
    if split not in ("ratio", "symmetric"):
        raise ValueError("split must be 'ratio' or 'symmetric', got %r" % (split,))
    m = copy.deepcopy(model).double().eval()
    x = x.detach().to(torch.float64)

    def per_image(t):
        return t.reshape(t.shape[0], -1).sum(dim=1).detach().clone()

    with torch.no_grad():
        # ---- true forward, keeping what is needed
        stem_out = m.relu(m.bn1(m.conv1(x)))           # maxpool input
        h = m.maxpool(stem_out)
        records = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for block in layer:
                y, rec = _block_forward(block, h)
                records.append((block, rec))
                h = y
        pooled_in = h
        feat = torch.flatten(m.avgpool(pooled_in), 1)
        logits = m.fc(feat)
        probs_all = torch.softmax(logits, dim=1)
        targets = logits.argmax(dim=1)
        probs = probs_all.gather(1, targets[:, None])[:, 0]

    # ---- relevance pass
    R = torch.zeros_like(logits)
    R.scatter_(1, targets[:, None], probs[:, None])
    if trace is not None:
        trace["probabilities"] = probs.clone()
        trace["merge_max_abs_err"] = []
        trace["merge_rel_err"] = []
        trace["merge_sums"] = []         # in backward order (last block first)
        trace["block_input_sums"] = []   # in backward order (last block first)
        trace["output"] = per_image(R)

    R = _zplus_linear(feat, m.fc, R, eps)                       # fc
    if trace is not None:
        trace["after_fc"] = per_image(R)
    R = _global_avgpool(pooled_in, R, eps)                      # avgpool + flatten
    if trace is not None:
        trace["layer4_output"] = per_image(R)
    for block, rec in reversed(records):
        R = _block_relevance(block, rec, R, split, include_identity, eps, trace)
        if trace is not None:
            trace["block_input_sums"].append(per_image(R))
    if trace is not None:
        trace["layer1_input"] = per_image(R)
    with torch.no_grad():
        R = _avgpool2x2_for_maxpool(stem_out, R, eps)           # maxpool
    if trace is not None:
        trace["maxpool_input"] = per_image(R)
    # BN1 and ReLU pass; stem conv with a = 1
    R = _zplus_conv(torch.ones_like(x), m.conv1, R, eps)
    if trace is not None:
        trace["input"] = per_image(R)
    return R.detach(), targets, probs.detach()


def paper_lrp(model, x, split="ratio", include_identity=True, eps=1e-5):
    """model: a torchvision ResNet (BasicBlock or Bottleneck, eval mode, BatchNorm NOT folded).
    x: float tensor [N,3,H,W]. Returns (relevance [N,3,H,W] float64 tensor, targets [N] long,
    probabilities [N] float64: the softmax probability of each target)."""
    return _paper_lrp_impl(model, x, split, include_identity, eps, None)


def paper_lrp_traced(model, x, split="ratio", include_identity=True, eps=1e-5):
    """paper_lrp, plus a dict of per-image relevance totals along the way: "output" (the
    initial relevance), "layer1_input", "maxpool_input", "input", "block_input_sums" and
    "merge_sums" ([N, 3]: R, R_s, R_m at each merge), both lists in backward order."""
    trace = {}
    relevance, targets, probabilities = _paper_lrp_impl(model, x, split, include_identity, eps, trace)
    return relevance, targets, probabilities, trace
