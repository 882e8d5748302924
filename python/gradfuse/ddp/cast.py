"""``fp16_hook`` / ``bf16_hook``: DDP's gradient buckets travel as 16-bit floats, cast by the
fused ``pack_`` kernel with the 1/world_size average folded in *before* rounding.

torch's ``fp16_compress_hook`` rounds to fp16 and then divides, so a gradient above 65504
becomes inf even when its average would fit; here it overflows only when the averaged value
(or the sum of the averaged values) does not fit. Where neither overflows the two agree up to
the rounding they share: bit for bit when the world size is a power of two (outside fp16's
subnormal range), within a 16-bit rounding of each rank's term otherwise.

The way back is ``unpack_``, which flags a non-finite reduced value in ``CastState.found_inf``:
the reduced buffer is the same on every rank, so every rank sees the same flag, and an
optimizer step can be skipped as GradScaler skips one."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import ops
from ._common import IterationClock, check_bucket, check_state, resolve_group


class CastState:
    """The state of :func:`fp16_hook` / :func:`bf16_hook`.

    - ``process_group``: DDP's group (None: the default group).
    - ``found_inf``: a one-element float32 tensor on the gradients' device, 1 when a reduced
      gradient of the last backward pass is inf or NaN (the same on every rank); cleared when
      the next backward pass reaches the hook. Use it as GradScaler's: skip the step, or pass
      it to ``gradfuse.ops.lars_update_(found_inf=...)``, which skips on the device.
    - ``overflow_count``: backward passes so far with ``found_inf`` set (reading it waits for
      the device).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None):
        self.process_group = resolve_group(process_group, "gradfuse.ddp.CastState")
        self.found_inf = torch.zeros(1, dtype=torch.float32)
        self._earlier_overflows = torch.zeros(1, dtype=torch.float32)
        self._clock = IterationClock()

    @property
    def overflow_count(self) -> int:
        return int((self._earlier_overflows + self.found_inf).item())

    def _begin(self, bucket: dist.GradBucket) -> None:
        """At an iteration's first bucket: the last iteration's flag is counted and cleared
        (DDP waited for all of its buckets before its backward pass returned)."""
        if not self._clock.begins(bucket):
            return
        device = bucket.buffer().device
        if self.found_inf.device != device:
            self.found_inf = self.found_inf.to(device)
            self._earlier_overflows = self._earlier_overflows.to(device)
        self._earlier_overflows += self.found_inf
        self.found_inf.zero_()


def _cast_hook(
    wire_dtype: torch.dtype, hook: str, state: CastState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    state = check_state(state, CastState, hook)
    group = state.process_group
    buffer = bucket.buffer()
    check_bucket(group, buffer, hook)
    state._begin(bucket)
    wire = torch.empty(buffer.numel(), dtype=wire_dtype, device=buffer.device)
    ops.pack_([buffer], wire, 1.0 / group.size())
    found_inf = state.found_inf

    def unpack(fut):
        fut.wait()
        # Several buckets' callbacks may run at once (Gloo's threads): each only ever stores
        # 1 into the flag, never reads it, so they agree.
        ops.unpack_(wire, [buffer], 1.0, nonfinite=found_inf)
        return buffer

    return dist.all_reduce(wire, group=group, async_op=True).get_future().then(unpack)


# The hooks' own signatures are unannotated: DDP compares the annotations with
# dist.GradBucket and Future[Tensor], and here they would be strings.
def fp16_hook(state, bucket):
    """Average the bucket as float16. ``model.register_comm_hook(CastState(), fp16_hook)``."""
    return _cast_hook(torch.float16, "fp16_hook", state, bucket)


def bf16_hook(state, bucket):
    """Average the bucket as bfloat16. ``model.register_comm_hook(CastState(), bf16_hook)``."""
    return _cast_hook(torch.bfloat16, "bf16_hook", state, bucket)
