"""What ``gradfuse-bench plan`` trains: the gradient tensors (in forward order) with how much
of the backward pass each one's layer takes, and the compute per sample.

Three sources: the built-in ResNet-50 (shapes from shapes.py, FLOPs counted layer by layer at
224x224), a JSON file, and a torch module (the ``train`` benchmark's models, FLOPs counted
with forward hooks)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .shapes import resnet50_shapes

# Training = forward + backward, and a layer's backward (input and weight gradients) costs
# about twice its forward: the usual 3x rule.
BACKWARD_PER_FORWARD = 2.0


@dataclass
class Workload:
    name: str
    numels: list[int]  # gradient tensors, forward order
    # Each tensor's share of the backward pass (forward order, sums to 1): its gradient is
    # ready when the layers after it, and its own, have run backward.
    backward_shares: list[float]
    forward_flops_per_sample: float = 0.0  # 0: compute comes as seconds (JSON workloads)
    forward_s: float = 0.0  # per step at the planned batch, when given in seconds
    backward_s: float = 0.0

    @property
    def parameters(self) -> int:
        return sum(self.numels)

    def ready_fractions(self) -> list[float]:
        """When each tensor's gradient is ready, as a fraction of the backward pass (forward
        order); backward runs from the last layer to the first."""
        done, out = 0.0, [0.0] * len(self.numels)
        for i in reversed(range(len(self.numels))):
            done += self.backward_shares[i]
            out[i] = min(1.0, done)
        return out


def _shares(weights: list[float], numels: list[int]) -> list[float]:
    total = sum(weights)
    if total <= 0:  # no FLOPs known: by size
        weights, total = [float(n) for n in numels], float(sum(numels))
    return [w / total for w in weights]


def resnet50() -> Workload:
    """torchvision's ResNet-50 (v1.5: stride in the 3x3 conv) at 224x224: 4.1 GMACs forward."""
    shapes = resnet50_shapes()
    flops = [0.0] * len(shapes)
    # Output side of each conv in shapes.py's order: stem 112, then per stage.
    sides = [112]
    side = 56
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out = side // 2 if (block == 0 and planes != 64) else side
            sides += [side, out, out] + ([out] if block == 0 else [])
            side = out
    convs = [i for i, s in enumerate(shapes) if len(s) == 4]
    if len(convs) != len(sides):
        raise AssertionError("resnet50 layout out of step with shapes.py")
    for i, s in zip(convs, sides):
        cout, cin, kh, kw = shapes[i]
        flops[i] = 2.0 * cout * cin * kh * kw * s * s
    fc = len(shapes) - 2
    flops[fc] = 2.0 * shapes[fc][0] * shapes[fc][1]
    numels = [math.prod(s) for s in shapes]
    return Workload("resnet50", numels, _shares(flops, numels), forward_flops_per_sample=sum(flops))


def from_json(path: str, batch_per_gpu: int) -> Workload:
    """A JSON workload: {"name": ..., "tensors": [shape | {"shape": [...], "flops": F}, ...]
    in forward order, and either "forward_flops_per_sample" (compute from the profile's
    FLOP/s) or "forward_s" and "backward_s" (seconds per step at the planned batch, measured on
    the target GPU; backward_s defaults to 2 x forward_s)}. Tensors without "flops" share the
    backward pass by size."""
    try:
        with open(path) as f:
            spec = json.load(f)
        tensors = spec["tensors"]
        shapes = [t["shape"] if isinstance(t, dict) else t for t in tensors]
        numels = [math.prod(int(d) for d in s) for s in shapes]
        flops = [float(t.get("flops", 0)) if isinstance(t, dict) else 0.0 for t in tensors]
    except OSError as e:
        raise ValueError(f"--model {path!r}: cannot read it: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"--model {path!r}: expected a JSON object with 'tensors' (a list of shapes), "
            f"got an error reading it: {e!r}"
        ) from None
    if not numels or min(numels) < 0:
        raise ValueError(f"--model {path!r}: 'tensors' must be a non-empty list of shapes")
    per_sample = float(spec.get("forward_flops_per_sample", 0))
    forward_s = float(spec.get("forward_s", 0))
    if per_sample <= 0 and forward_s <= 0:
        raise ValueError(
            f"--model {path!r}: give 'forward_flops_per_sample' or 'forward_s' (seconds per "
            f"step at --batch-per-gpu {batch_per_gpu})"
        )
    backward_s = float(spec.get("backward_s", BACKWARD_PER_FORWARD * forward_s))
    if min(weights := flops) < 0:
        raise ValueError(f"--model {path!r}: flops must be >= 0")
    return Workload(
        str(spec.get("name", path)),
        numels,
        _shares(weights, numels),
        forward_flops_per_sample=per_sample,
        forward_s=forward_s,
        backward_s=backward_s,
    )


def from_module(name: str, module, sample_shape: tuple[int, ...]) -> Workload:
    """A torch module's parameters (registration order, which is the forward order for the
    sequential models here) with each Conv/Linear layer's FLOPs, counted on one sample."""
    import torch
    from torch import nn

    layer_flops: dict[int, float] = {}

    def count(layer, _inputs, output):
        if isinstance(layer, nn.Conv2d):
            per_out = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        else:
            per_out = layer.in_features
        layer_flops[id(layer.weight)] = 2.0 * output.numel() * per_out

    hooks = [
        m.register_forward_hook(count)
        for m in module.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            module(torch.zeros(1, *sample_shape))
    finally:
        for h in hooks:
            h.remove()
    params = list(module.parameters())
    numels = [p.numel() for p in params]
    flops = [layer_flops.get(id(p), 0.0) for p in params]
    return Workload(name, numels, _shares(flops, numels), forward_flops_per_sample=sum(flops))
