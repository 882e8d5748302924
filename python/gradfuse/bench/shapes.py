"""Parameter shapes of real models, for tests and benchmarks (no torchvision needed)."""

from __future__ import annotations


def resnet50_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """The 161 parameter tensors of torchvision's ResNet-50 (25,557,032 values), in order."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if block == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(num_classes, 2048), (num_classes,)]
    return shapes
