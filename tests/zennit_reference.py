"""Zennit 1.0's relevance for a torch model, as the Zennit agreement tests take it."""
import copy

import torch
from zennit.attribution import Gradient


def zennit_lrp(model, x, composite, dtype=torch.float64):
    """(relevance, targets): Zennit's attribution of each image's top-1 logit under `composite`,
    output relevance one-hot(target) x target logit, in `dtype` (float64: Zennit's own rounding
    is not what the tests measure)."""
    model = copy.deepcopy(model).to(dtype)
    inputs = torch.tensor(x, dtype=dtype, requires_grad=True)
    with Gradient(model, composite) as attributor:
        logits = model(inputs)
        target = logits.argmax(1)
        rows = torch.arange(len(target))
        start = torch.zeros_like(logits)
        start[rows, target] = logits[rows, target]
        _, relevance = attributor(inputs, start)
    return relevance.detach().double().numpy(), target.numpy()
