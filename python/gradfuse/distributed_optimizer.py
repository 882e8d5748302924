"""DistributedOptimizer: wraps any torch optimizer so gradients are reduced across ranks. Hooks
note each gradient as backward produces it; the reduction of a bucket of gradients starts the
moment its last one arrives (so communication overlaps the rest of backward), and ``step()``
waits for them.

Usage (Horovod's pattern)::

    opt = gradfuse.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters())
    gradfuse.broadcast_parameters(model.state_dict(), root_rank=0)
    gradfuse.broadcast_optimizer_state(opt, root_rank=0)
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

Gradient clipping or mixed precision: reduce first, then step without reducing again::

    scaler.scale(loss).backward()
    opt.synchronize()
    scaler.unscale_(opt); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with opt.skip_synchronize():
        scaler.step(opt)
    scaler.update()
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable

import torch

from . import _engine, autotune, collectives
from . import process_sets as _sets
from .compression import CastCompressor, Compression, NoneCompressor, TopKCompressor
from .process_sets import ProcessSet, global_process_set
from .sparse import sparse_allreduce_async


class _DistributedOptimizer:
    """Methods mixed into a subclass of the wrapped optimizer's class (see DistributedOptimizer)."""

    def _gf_setup(
        self,
        named_parameters,
        compression,
        backward_passes_per_step,
        op,
        gradient_predivide_factor,
        bucket_cap_mb,
        gradient_as_bucket_view,
        process_set,
        groups=None,
    ):
        _engine._require()  # as Horovod (it asks size()): which ranks reduce is known after init
        if not isinstance(process_set, ProcessSet):
            raise TypeError(f"process_set must be a gradfuse.ProcessSet, got {process_set!r}")
        self._gf_process_set = process_set
        if backward_passes_per_step < 1:
            raise ValueError(
                f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}"
            )
        if op not in (collectives.Average, collectives.Sum, collectives.Min, collectives.Max):
            raise ValueError(f"op must be gradfuse.Average, Sum, Min or Max, got {op!r}")
        if gradient_predivide_factor != 1.0 and op != collectives.Average:
            raise ValueError("gradient_predivide_factor is only valid with op=gradfuse.Average")
        self._gf_check_compression(compression, op)
        bucket_given = bucket_cap_mb
        bucket_cap_mb = self._gf_check_buckets(groups, bucket_cap_mb, compression)
        if not isinstance(bucket_cap_mb, (int, float)) or bucket_cap_mb < 0:
            raise ValueError(f"bucket_cap_mb must be a number >= 0, got {bucket_cap_mb!r}")
        if gradient_as_bucket_view and (
            bucket_cap_mb == 0 or not isinstance(compression, NoneCompressor)
        ):
            raise ValueError(
                "gradient_as_bucket_view=True needs bucket_cap_mb > 0 and "
                f"compression=Compression.none, got bucket_cap_mb={bucket_cap_mb!r} and "
                f"compression={compression!r}"
            )
        params = [p for group in self.param_groups for p in group["params"]]
        self._gf_names = self._gf_resolve_names(named_parameters, params)
        self._gf_params = [p for p in params if p.requires_grad]
        self._gf_compression = compression
        self._gf_passes = backward_passes_per_step
        self._gf_op = op
        self._gf_predivide = float(gradient_predivide_factor)
        self._gf_delay = {p: backward_passes_per_step for p in self._gf_params}
        self._gf_pending = {}  # param -> (kind, handles, context), reduction in flight
        if groups is None:
            buckets = self._gf_make_buckets(
                self._gf_params, int(bucket_cap_mb * 2**20), compression
            )
        else:
            buckets = self._gf_group_buckets(self._gf_params, groups)
        self._gf_set_buckets(buckets, gradient_as_bucket_view)
        # Buckets sized by the default cap are autotune's to size (gradfuse.autotune).
        tunable = (
            groups is None and bucket_given is None and not isinstance(compression, TopKCompressor)
        )
        self._gf_autotune = autotune.attach(
            process_set, bucket_cap_mb if tunable else None, self._gf_resize if tunable else None
        )
        self._gf_waiting = {}  # bucket index -> set of its params whose gradient is ready
        self._gf_synchronized = False
        self._gf_should_synchronize = True
        self._gf_warned_step_after_sync = False
        # Top-k's per-parameter state (residuals, velocities), this optimizer's own.
        is_topk = isinstance(compression, TopKCompressor)
        self._gf_topk = compression.bind(self) if is_topk else None
        # A rank outside the process set steps on its own gradients (Horovod): no hooks.
        self._gf_hook_handles = [
            p.register_post_accumulate_grad_hook(self._gf_hook)
            for p in self._gf_params
            if process_set.included()
        ]

    @staticmethod
    def _gf_check_compression(compression, op):
        if isinstance(compression, type) and issubclass(compression, TopKCompressor):
            raise TypeError("compression=Compression.topk must be called: Compression.topk(ratio)")
        if isinstance(compression, TopKCompressor):
            if op not in (collectives.Average, collectives.Sum):
                raise ValueError(
                    f"Compression.topk needs op=gradfuse.Average or Sum (its sparse "
                    f"gradients are summed by scatter-add), got op={op!r}"
                )
            return
        if not all(callable(getattr(compression, m, None)) for m in ("compress", "decompress")):
            raise TypeError(
                "compression must be a gradfuse.Compression.* or a Compressor (a class or "
                f"object with compress(tensor) and decompress(tensor, ctx)), got {compression!r}"
            )

    @staticmethod
    def _gf_check_buckets(groups, bucket_cap_mb, compression):
        """bucket_cap_mb, defaulted; ValueError where groups= cannot apply."""
        if groups is None:
            return _DEFAULT_BUCKET_CAP_MB if bucket_cap_mb is None else bucket_cap_mb
        if bucket_cap_mb is not None:
            raise ValueError(
                "give groups (Horovod's explicit buckets) or bucket_cap_mb (buckets by size), "
                f"not both; got bucket_cap_mb={bucket_cap_mb!r}"
            )
        if isinstance(compression, TopKCompressor):
            raise ValueError(  # noqa: TRY004  (a value of compression that groups rule out)
                "groups cannot be combined with Compression.topk (top-k reduces each gradient "
                "on its own)"
            )
        return _DEFAULT_BUCKET_CAP_MB  # not used: the groups are the buckets

    @staticmethod
    def _gf_group_buckets(params, groups):
        """Horovod's groups as buckets: a count splits the trainable parameters, in
        param_groups order, into that many consecutive runs of near-equal length (Horovod's
        split); lists keep only this optimizer's trainable parameters (Horovod ignores the
        other tensors). A parameter in no group is reduced alone, as soon as it is ready."""
        if isinstance(groups, int):
            per, extra = divmod(len(params), groups)
            bounds = [i * per + min(i, extra) for i in range(groups + 1)]
            chunks = [params[bounds[i] : bounds[i + 1]] for i in range(groups)]
        else:
            trainable = dict.fromkeys(params)  # keyed by identity, as tensors hash
            chunks = [[p for p in group if p in trainable] for group in groups]
        return [tuple(chunk) for chunk in chunks if chunk]

    @staticmethod
    def _gf_make_buckets(params, cap_bytes, compression):
        """Consecutive parameters in reverse order (roughly the order backward produces their
        gradients) grouped into buckets of up to `cap_bytes`, the first capped at 1 MiB so
        communication starts early (DDP's layout). Each bucket is submitted as one group, so
        the engine negotiates and fuses it in one go instead of one cycle per gradient. Top-k
        compression and cap 0 keep one reduction per gradient, submitted at once."""
        if cap_bytes == 0 or isinstance(compression, TopKCompressor):
            return []
        buckets, current, current_bytes = [], [], 0
        for p in reversed(params):
            cap = min(cap_bytes, 1 << 20) if not buckets else cap_bytes
            nbytes = p.numel() * p.element_size()
            if current and current_bytes + nbytes > cap:
                buckets.append(tuple(current))
                current, current_bytes = [], 0
            current.append(p)
            current_bytes += nbytes
        if current:
            buckets.append(tuple(current))
        return buckets

    def _gf_set_buckets(self, buckets, as_views):
        """Buckets (dense and 16-bit reductions), each submitted in its own order when its last
        gradient arrives, with the gradient views that follow their order (as_views)."""
        self._gf_buckets = buckets
        # param -> (bucket index, bucket size)
        self._gf_bucket_of = {
            p: (i, len(bucket)) for i, bucket in enumerate(self._gf_buckets) for p in bucket
        }
        # Submission order: bucket by bucket, then the parameters in no bucket.
        self._gf_order = [p for bucket in self._gf_buckets for p in bucket]
        self._gf_order += [p for p in self._gf_params if p not in self._gf_bucket_of]
        self._gf_views = self._gf_make_views() if as_views else {}

    def _gf_resize(self, cap_mb):
        """Autotune, at a step boundary (no reduction in flight): buckets of up to cap_mb MiB,
        the gradient views (if any) rebuilt to follow them."""
        cap = int(cap_mb * 2**20)
        self._gf_set_buckets(
            self._gf_make_buckets(self._gf_params, cap, self._gf_compression),
            bool(self._gf_views),
        )

    def _gf_make_views(self):
        """gradient_as_bucket_view: one flat buffer per (device, dtype) holds the gradients in
        submission order, and each parameter's .grad is a view of it. Backward accumulates into
        the views, and a bucket's gradients then lie back to back in the order they are
        submitted, so the engine reduces them in place with no fusion copies (as DDP's
        gradient_as_bucket_view). Returns param -> its view."""
        groups = {}
        for p in self._gf_order:
            groups.setdefault((p.device, p.dtype), []).append(p)
        views = {}
        for (device, dtype), params in groups.items():
            flat = torch.zeros(sum(p.numel() for p in params), device=device, dtype=dtype)
            offset = 0
            for p in params:
                view = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
                views[p] = view
        return views

    @staticmethod
    def _gf_resolve_names(named_parameters, params):
        if named_parameters is None:
            # Every rank builds the optimizer from the same model: positions agree.
            return {p: f"allreduce.noname.{i}" for i, p in enumerate(params)}
        named = list(named_parameters)
        if any(not (isinstance(item, tuple) and len(item) == 2) for item in named):
            raise ValueError(
                "named_parameters must be (name, parameter) pairs, as "
                "model.named_parameters() gives"
            )
        names = [n for n, _ in named]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"named_parameters has duplicate names: {duplicates}")
        by_param = {p: f"allreduce.{n}" for n, p in named}
        unnamed = [i for i, p in enumerate(params) if p not in by_param]
        if unnamed:
            raise ValueError(
                f"named_parameters was given but {len(unnamed)} of the optimizer's parameters "
                f"have no name (positions {unnamed[:10]} in its param_groups); pass "
                f"model.named_parameters() for the whole model the optimizer updates"
            )
        return by_param

    # ---- reduction -------------------------------------------------------------------------

    def _gf_scales(self):
        """(engine op, prescale, postscale). Average = Sum with 1/size (the process set's) split
        around it."""
        if self._gf_op == collectives.Average:
            size = _sets._size(self._gf_process_set)
            return collectives.Sum, 1.0 / self._gf_predivide, self._gf_predivide / size
        return self._gf_op, 1.0, 1.0

    def _gf_hook(self, p):
        bucket = self._gf_bucket_of.get(p)
        waiting = self._gf_waiting.get(bucket[0], ()) if bucket else ()
        if p in self._gf_pending or p in waiting:
            raise RuntimeError(
                f"the gradient of {self._gf_names[p]} was computed more than "
                f"backward_passes_per_step={self._gf_passes} times before step(); raise "
                f"backward_passes_per_step or call step() more often"
            )
        self._gf_delay[p] -= 1
        if self._gf_delay[p] > 0:
            return
        self._gf_restore_view(p)
        if bucket is None:
            self._gf_pending[p] = self._gf_reduce_async(p)
            return
        index, bucket_size = bucket
        ready = self._gf_waiting.setdefault(index, set())
        ready.add(p)
        if len(ready) == bucket_size:
            del self._gf_waiting[index]
            self._gf_submit(self._gf_buckets[index])  # in bucket order, not arrival order

    def _gf_restore_view(self, p):
        """gradient_as_bucket_view: points p.grad back at its view when the user replaced it
        (e.g. model.zero_grad() set it to None and backward made a new tensor), copying the
        replacement in, or zeros for None. Nothing to do without views or when it is intact."""
        view = self._gf_views.get(p)
        if view is None or (p.grad is not None and p.grad.data_ptr() == view.data_ptr()):
            return
        if p.grad is None:
            view.zero_()
        else:
            view.copy_(p.grad)
        p.grad = view

    def _gf_submit(self, params):
        """Starts the reductions of `params` as one group (one negotiation, fused)."""
        with collectives.submitted_together():
            for p in params:
                self._gf_pending[p] = self._gf_reduce_async(p)

    def _gf_reduce_async(self, p):
        """Starts p's reduction; returns (kind, handles, context) for _gf_finish."""
        name = self._gf_names[p]
        if p.grad.is_sparse:  # Horovod's sparse path (no compression, no predivide)
            self._gf_sparse_dims[p] = p.grad.sparse_dim()
            if not self._gf_sparse_as_dense:
                handle = sparse_allreduce_async(p.grad, name, self._gf_op, self._gf_process_set)
                return ("sparse", (handle,), None)
            p.grad = p.grad.to_dense()
        compression = self._gf_compression
        if self._gf_topk is not None:
            return self._gf_topk_async(p, name)
        if isinstance(compression, NoneCompressor) or (
            isinstance(compression, CastCompressor)
            # Horovod's fp16 casts floating point only; already 16-bit needs no cast.
            and (not p.grad.is_floating_point() or p.grad.dtype == compression.wire_dtype)
        ):
            sq_norm = self._gf_sq_norm_slot(p)
            if sq_norm is not None:
                op, prescale, postscale = self._gf_scales()
                handle = collectives._allreduce_inplace_with_sq_norm(
                    p.grad, sq_norm, name, op, prescale, postscale, self._gf_process_set
                )
                return ("dense_norm", (handle,), None)
            return ("dense", (self._gf_allreduce(p.grad, name),), None)
        if isinstance(compression, CastCompressor):  # the cast fused with the scaling
            op, prescale, postscale = self._gf_scales()
            wire = compression.pack(p.grad, prescale)
            handle = collectives.allreduce_async_(
                wire, name=name, op=op, process_set=self._gf_process_set
            )
            return ("cast", (handle,), (wire, postscale))
        wire, ctx = compression.compress(p.grad)  # a user's Compressor, as Horovod calls it
        if not isinstance(wire, torch.Tensor):
            raise TypeError(
                f"{compression!r}.compress must return (tensor, ctx), got a "
                f"{type(wire).__name__} for {name}"
            )
        return ("compressed", (self._gf_allreduce(wire, name),), ctx)

    def _gf_sq_norm_slot(self, p):
        """Where the engine writes the reduced gradient's squared norm, for optimizers that
        take it (gradfuse.optim.LARS: its step is then one pass), else None."""
        slot_of = getattr(self, "_gf_grad_sq_norm_out", None)
        if (
            slot_of is None
            or not p.grad.is_floating_point()
            or self._gf_op
            not in (
                collectives.Average,
                collectives.Sum,
            )
        ):
            return None
        return slot_of(p)

    def _gf_allreduce(self, tensor, name):
        """Starts the in-place allreduce of `tensor` with this optimizer's op and scaling."""
        op, prescale, postscale = self._gf_scales()
        return collectives.allreduce_async_(
            tensor,
            name=name,
            op=op,
            prescale_factor=prescale,
            postscale_factor=postscale,
            process_set=self._gf_process_set,
        )

    def _gf_topk_async(self, p, name):
        payload, ctx = self._gf_topk.compress(p.grad, p)
        if isinstance(payload, torch.Tensor):  # a small tensor, sent dense
            return ("topk", (self._gf_allreduce(payload, name),), ctx)
        values, indices = payload
        ps = self._gf_process_set
        handles = (
            collectives.allgather_async(values, name=name + ".values", process_set=ps),
            collectives.allgather_async(indices, name=name + ".indices", process_set=ps),
        )
        return ("topk", handles, ctx)

    def _gf_finish(self, p, kind, handles, context):
        results = [collectives.synchronize(h) for h in handles]
        if kind == "dense_norm":
            self._gf_grad_sq_norm_written(p)
        elif kind == "cast":
            wire, postscale = context
            self._gf_compression.unpack(wire, p.grad, postscale)
        elif kind == "sparse":
            p.grad = results[0]
        elif kind == "compressed":
            self._gf_set_grad(p, self._gf_compression.decompress(results[0], context))
        elif kind == "topk":
            sparse = len(results) == 2  # (values, indices), gathered: summed by scatter-add
            reduced = self._gf_topk.decompress(tuple(results) if sparse else results[0], context)
            if sparse and self._gf_op == collectives.Average:
                reduced = reduced.div_(_sets._size(self._gf_process_set))
            p.grad.copy_(reduced)

    def _gf_set_grad(self, p, reduced):
        """Copies a decompressed gradient into p.grad (Horovod set_()s it; a copy keeps the
        .grad tensor the user and the optimizer hold, and its dtype)."""
        if not isinstance(reduced, torch.Tensor) or reduced.shape != p.grad.shape:
            raise ValueError(
                f"{self._gf_compression!r}.decompress must return a tensor of the gradient's "
                f"shape {list(p.grad.shape)} for {self._gf_names[p]}, got "
                f"{list(reduced.shape) if isinstance(reduced, torch.Tensor) else reduced!r}"
            )
        if reduced is not p.grad:
            p.grad.copy_(reduced)

    def synchronize(self):
        """Wait for every gradient's reduction (starting those whose hook did not fire on this
        rank, with zero gradients, so ranks using different parts of the model never hang)."""
        if self._gf_synchronized:
            return
        if not self._gf_process_set.included():
            self._gf_synchronized = True  # nothing to reduce outside the process set
            return
        # Buckets this rank did not complete (some gradients unused here, or fewer backward
        # passes than backward_passes_per_step) and gradients never computed go now.
        self._gf_waiting = {}
        missing = [p for p in self._gf_order if p not in self._gf_pending]
        for p in missing:
            self._gf_restore_view(p)
            if p.grad is None:
                p.grad = self._gf_zero_grad(p)
        self._gf_submit(missing)
        pending, self._gf_pending = self._gf_pending, {}
        errors = []
        for p, (kind, handles, context) in pending.items():
            try:
                self._gf_finish(p, kind, handles, context)
            except (RuntimeError, ValueError) as exc:  # finish the others: none left dangling
                errors.append(exc)
        self._gf_delay = {p: self._gf_passes for p in self._gf_params}
        if errors:
            raise errors[0]
        self._gf_synchronized = True

    def _gf_zero_grad(self, p):
        """The zero gradient this rank reduces for a parameter it computed none for: sparse
        (no nonzeros) where the parameter's gradient was sparse before, so that it meets the
        other ranks' sparse reduction (a parameter's first gradient must come on every rank)."""
        sparse_dim = self._gf_sparse_dims.get(p)
        if sparse_dim is None or self._gf_sparse_as_dense:
            return torch.zeros_like(p)
        indices = torch.empty((sparse_dim, 0), dtype=torch.int64, device=p.device)
        values = p.new_empty((0, *p.shape[sparse_dim:]))
        return torch.sparse_coo_tensor(indices, values, p.shape)

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Inside this context ``step()`` does not reduce (after an explicit synchronize())."""
        self._gf_should_synchronize = False
        try:
            yield
        finally:
            self._gf_should_synchronize = True

    def step(self, closure=None):
        if self._gf_should_synchronize:
            if self._gf_synchronized and not self._gf_warned_step_after_sync:
                self._gf_warned_step_after_sync = True
                warnings.warn(
                    "optimizer.step() was called after optimizer.synchronize() outside "
                    "optimizer.skip_synchronize(); the gradients are not reduced twice, but "
                    "wrap step() in `with optimizer.skip_synchronize():` to say so",
                    stacklevel=2,
                )
            self.synchronize()
        self._gf_synchronized = False
        if self._gf_topk is None:
            loss = self._gf_base.step(self, closure)
        else:
            with self._gf_topk.optimizer_step():  # so SGD's momentum is not applied twice
                loss = self._gf_base.step(self, closure)
        if self._gf_autotune is not None:
            self._gf_autotune.after_step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        if self._gf_pending or self._gf_waiting:
            raise RuntimeError(
                "optimizer.zero_grad() was called while gradient reductions are in flight "
                "(after backward() and before step() or synchronize()); the reductions would "
                "race with the zeroing. Call step() or synchronize() first."
            )
        if self._gf_views:
            # set_to_none (torch's default), as DDP's gradient_as_bucket_view: backward makes
            # each gradient anew and the hook copies it into its view (_gf_restore_view), one
            # pass over the gradients instead of zeroing the buffers and adding into them.
            # Otherwise the gradients stay views of the flat buffers, zeroed.
            for p, view in self._gf_views.items():
                if set_to_none:
                    p.grad = None
                else:
                    view.zero_()
                    p.grad = view
            return None
        return self._gf_base.zero_grad(self, set_to_none)

    def state_dict(self):
        state = self._gf_base.state_dict(self)
        if self._gf_topk is not None:
            state["gradfuse"] = {"topk": self._gf_topk.state_dict(self._gf_params)}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("gradfuse", None)
        topk = (extra or {}).get("topk")
        if topk is not None and self._gf_topk is None:
            raise ValueError(
                "state_dict holds Compression.topk state (residuals, velocities) but this "
                f"optimizer's compression is {self._gf_compression!r}"
            )
        self._gf_base.load_state_dict(self, state_dict)
        if topk is not None:
            self._gf_topk.load_state_dict(topk, self._gf_params)


def _subclass_sharing_state(optimizer, mixin):
    """An instance of a new subclass of type(optimizer) with `mixin`'s methods, sharing the
    optimizer's state (param_groups, state); `_gf_base` is the wrapped class."""
    base = type(optimizer)
    methods = {
        k: v for k, v in vars(mixin).items() if k not in ("__dict__", "__weakref__", "__doc__")
    }
    cls = type(base.__name__, (base, mixin), {**methods, "_gf_base": base})
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)
    return wrapped


def DistributedOptimizer(  # Horovod's name: a factory that reads like a class
    optimizer: torch.optim.Optimizer,
    named_parameters=None,
    compression=Compression.none,
    backward_passes_per_step: int = 1,
    op=collectives.Average,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups=None,
    sparse_as_dense: bool = False,
    process_set: ProcessSet = global_process_set,
    bucket_cap_mb: float | None = None,
    gradient_as_bucket_view: bool = False,
):
    """Wrap ``optimizer`` so ``step()`` applies gradients reduced over all ranks.

    Returns an instance of a subclass of ``type(optimizer)`` sharing its state (use the
    returned object from then on). ``named_parameters`` (e.g. ``model.named_parameters()``)
    names each gradient's reduction; without it, positions in ``param_groups`` are used.
    ``compression``: ``Compression.none`` / ``fp16`` / ``bf16`` / ``topk(ratio, ...)``, or a
    user's ``gradfuse.compression.Compressor`` (class or instance; Horovod's interface: its
    ``compress`` is applied to each gradient before the allreduce, ``decompress`` after, and
    the result copied into ``.grad``). ``topk`` with ``torch.optim.SGD(momentum=m)`` takes the
    momentum over (DGC's momentum correction; see ``TopKCompressor``).
    ``backward_passes_per_step``: gradients accumulate locally over that many backward
    passes before one reduction. ``op``: ``Average`` (default), ``Sum``, ``Min``, ``Max``, or
    ``Adasum`` (each rank steps locally and the parameter updates are combined by Adasum; see
    gradfuse.adasum_optimizer).
    ``gradient_predivide_factor``: with Average, divide by it before the sum and by
    ``size / factor`` after (keeps fp16 sums in range).
    ``groups`` (Horovod's): the buckets, given instead of sized: a list of lists of
    parameters (each list is reduced together, submitted when its last gradient is ready; a
    parameter in no list alone, when ready), or an int n (the trainable parameters split into
    n consecutive runs, in ``param_groups`` order). ``num_groups``: Horovod's deprecated int
    form (warns). Neither given: buckets by ``bucket_cap_mb``.
    ``bucket_cap_mb`` (default 25): gradients are submitted in buckets of up to this many MiB
    (the first 1 MiB), each when its last gradient is ready, so the engine negotiates and fuses
    a bucket at once; 0 submits each gradient as soon as it is ready (Horovod's default).
    ``gradient_as_bucket_view``: each ``.grad`` becomes a view of one flat buffer, so buckets
    are reduced in place with no fusion copies (DDP's option of the same name); after
    ``zero_grad()`` (set_to_none) backward's new gradients are copied into the views.
    ``sparse_as_dense``: sparse gradients (e.g. ``nn.Embedding(sparse=True)``) are made dense
    and allreduced; by default they are reduced sparse, Horovod's way (every rank's nonzeros
    allgathered, ``sparse_allreduce_async``; op Average or Sum), and ``.grad`` stays sparse.
    ``process_set``: reduce over that set's ranks only (Average divides by its size); on a
    rank outside it, ``step()`` applies the local gradients (as Horovod). ``op=Adasum`` works on
    the global set only (another set: ``NotImplementedError``, as Horovod).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    if hasattr(optimizer, "_gf_setup"):
        raise TypeError("optimizer is already a gradfuse.DistributedOptimizer")
    if not isinstance(sparse_as_dense, bool):
        raise TypeError(f"sparse_as_dense must be a bool, got {sparse_as_dense!r}")
    groups = _horovod_groups(groups, num_groups)
    if op == collectives.Adasum:
        if groups is not None:
            warnings.warn(
                "DistributedOptimizer(op=Adasum) ignores groups/num_groups (as Horovod does): "
                "it reduces each parameter's update on its own",
                stacklevel=2,
            )
        from .adasum_optimizer import adasum_optimizer

        # As Horovod: refused at construction, on every rank (members or not).
        if not isinstance(process_set, ProcessSet):
            raise TypeError(f"process_set must be a gradfuse.ProcessSet, got {process_set!r}")
        if process_set.process_set_id != 0:
            raise NotImplementedError(
                "DistributedOptimizer: op=Adasum works on the global process set only (as in "
                f"Horovod), got process_set={process_set}"
            )

        return adasum_optimizer(
            optimizer,
            named_parameters,
            compression,
            backward_passes_per_step,
            gradient_predivide_factor,
            gradient_as_bucket_view,
        )
    wrapped = _subclass_sharing_state(optimizer, _DistributedOptimizer)
    wrapped._gf_sparse_as_dense = sparse_as_dense
    wrapped._gf_sparse_dims = {}  # param -> sparse_dim of its sparse gradients
    wrapped._gf_setup(
        named_parameters,
        compression,
        backward_passes_per_step,
        op,
        gradient_predivide_factor,
        bucket_cap_mb,
        gradient_as_bucket_view,
        process_set,
        groups,
    )
    return wrapped


def _horovod_groups(groups, num_groups):
    """Horovod's groups and deprecated num_groups as one value: None, a count > 0, or a list
    of lists of tensors; ValueError (Horovod's type, hence the noqa) for what Horovod refuses,
    and for both. An inner iterable may be a generator (model.fc.parameters()): it is read
    once here (Horovod reads it twice, the second time empty)."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be an int >= 0, got {num_groups!r}")
    if num_groups:
        warnings.warn(
            "DistributedOptimizer: num_groups is deprecated (Horovod replaced it by groups); "
            f"use groups={num_groups}",
            DeprecationWarning,
            stacklevel=3,
        )
        if groups is not None:
            raise ValueError(
                f"give groups or the deprecated num_groups, not both (num_groups={num_groups})"
            )
        return num_groups
    if groups is None or (isinstance(groups, int) and not isinstance(groups, bool) and groups > 0):
        return groups
    expected = "an int > 0 or a list of lists of parameters ([[p1, p2], [p3]])"
    if not isinstance(groups, (list, tuple)):
        raise ValueError(f"groups must be {expected}, got {groups!r}")  # noqa: TRY004
    where = {}  # tensor -> "[i][j]", its first place
    lists = []
    for i, group in enumerate(groups):
        if isinstance(group, (torch.Tensor, str, bytes)) or not isinstance(group, Iterable):
            raise ValueError(  # noqa: TRY004
                f"groups must be {expected}; groups[{i}] is a {type(group).__name__}"
            )
        lists.append(list(group))
        for j, p in enumerate(lists[-1]):
            if not isinstance(p, torch.Tensor):
                raise ValueError(  # noqa: TRY004
                    f"groups[{i}][{j}] must be a parameter (torch.Tensor), got a {type(p).__name__}"
                )
            if p in where:
                raise ValueError(
                    f"groups[{i}][{j}] is the parameter already at groups{where[p]}: a "
                    "parameter can be in one group only"
                )
            where[p] = f"[{i}][{j}]"
    return lists


_DEFAULT_BUCKET_CAP_MB = 25


__all__ = ["DistributedOptimizer"]
