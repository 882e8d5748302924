"""The exceptions of gradfuse's Horovod surface.

``HorovodInternalError`` is what a failed collective raises, as in Horovod (which wraps every
failure that reaches ``synchronize`` in it): code written for Horovod's elastic loops
(``except hvd.HorovodInternalError``) catches a dead peer, and code that catches
``RuntimeError`` keeps working, since it is one."""

from __future__ import annotations


class HorovodInternalError(RuntimeError):
    """A collective failed after it was submitted to the engine: a peer died, stopped or timed
    out, the transport reported an error, the ranks disagreed on the tensor (shape, dtype,
    device, op, root), or the engine was shut down or stopped meanwhile. The message says which.
    Errors found before submission keep their own type: bad arguments are ValueError or
    TypeError, misuse (e.g. a blocking call inside submitted_together()) RuntimeError."""


class NotInitializedError(ValueError, RuntimeError):
    """A query or collective before init() or after shutdown(). Horovod raises ValueError
    there and gradfuse used to raise RuntimeError: this is both, so either except works."""


__all__ = ["HorovodInternalError", "NotInitializedError"]
