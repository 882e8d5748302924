"""The engine's fusion buffer layout (issue 12 item 5): every tensor starts at a 16-byte-aligned
offset, pack() writes exactly each tensor's range (the padding keeps what it held), unpack()
reads it back, and the sums of squares unpack takes cover the tensor only. Single process: the
engine's own pack()/unpack() through gradfuse._C._testing.fusion_round_trip."""

from __future__ import annotations

import math

import pytest
from gradfuse import _C

T = _C._testing
ELEMENT_SIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "int32": 4}
# Odd sizes (padding after each), sizes already aligned (no padding: one kernel run), empty.
NUMELS = [3, 5, 1, 7, 16, 8, 0, 2, 33]


def values(i, numel):
    return [float(i + 1 + k % 7) for k in range(numel)]


@pytest.mark.parametrize(
    ("dtype", "flat_dtype", "scale"),
    [
        ("float32", "float32", 1.0),
        ("float16", "float32", 0.5),  # fp16 gradients in an fp32 buffer
        ("float32", "float16", 2.0),  # compressed on the wire
        ("bfloat16", "bfloat16", 1.0),
        ("float64", "float64", 0.25),
        ("int8", "int8", 1.0),
        ("int32", "int32", 1.0),
    ],
)
def test_every_tensor_starts_aligned_and_padding_is_never_written(dtype, flat_dtype, scale):
    offsets, flat, unpacked, norms = T.fusion_round_trip(NUMELS, dtype, flat_dtype, scale)
    size = ELEMENT_SIZE[flat_dtype]
    assert len(offsets) == len(NUMELS) + 1
    written = set()
    for i, numel in enumerate(NUMELS):
        assert offsets[i] * size % 16 == 0, (i, offsets)
        # Each tensor right after the previous one, rounded up to 16 bytes; the end is not padded.
        previous_end = offsets[i - 1] + NUMELS[i - 1] if i else 0
        assert offsets[i] == -(-previous_end * size // 16) * 16 // size, (i, offsets)
        assert flat[offsets[i] : offsets[i] + numel] == [v * scale for v in values(i, numel)]
        assert unpacked[i] == [v * scale for v in values(i, numel)], i
        written.update(range(offsets[i], offsets[i] + numel))
    assert offsets[-1] == offsets[-2] + NUMELS[-1] == len(flat)
    padding = [flat[k] for k in range(len(flat)) if k not in written]
    assert padding, "these sizes must leave padding"
    filler = -1.0 if dtype.startswith("int") else None
    assert all((math.isnan(v) if filler is None else v == filler) for v in padding), padding
    if not dtype.startswith("int"):
        assert norms == [sum(v * v for v in u) for u in unpacked]


def test_aligned_sizes_leave_no_padding():
    offsets, flat, _, _ = T.fusion_round_trip([4, 8, 12], "float32", "float32", 1.0)
    assert offsets == [0, 4, 12, 24]
    assert not any(math.isnan(v) for v in flat)
