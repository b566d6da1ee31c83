"""Multi-tensor kernels of the PyTorch adapter (private).

The full-size elementwise passes of ALGORITHMS.md §3–§5 over a list of same-device,
same-dtype tensors, written with ``torch._foreach_*`` ops and in-place ``out=`` writes so
that a step allocates no more full-size temporaries than ``torch.optim.AdamW(foreach=True)``
does. Every per-tensor scalar rule (the radius's own Adam, the decay ratio) is a call into
:mod:`tether.core` on the per-tensor scalars stacked into one vector: those core functions
are elementwise on their scalar arguments. ``tests/torch/test_ops.py`` checks each kernel
against the core at 1e-12 in float64.

No function here reads a device value on the host, so a step traces under
``torch.compile(fullgraph=True)`` and never synchronises a GPU stream. The learning rate ``lr``
is a Python float (``torch.optim``'s convention) or a 0-d tensor on the tensors' device (what
Keras passes on its torch backend): a tensor is never read on the host, except by the C
kernels' path, which takes only CPU tensors and never runs in a trace.

The three ``*_step_`` functions are whole steps of one bucket (tensors of one device, dtype
and anchor mode); `tether.adapters.torch` and, on the torch backend, `tether.adapters.keras`
both call them. On the CPU they make one pass over each tensor a block of rows at a time,
and FTP's steps call the C kernels of ``adapters/_kernels.c`` where those were built (the
end of this module). The tensors may be the local shards of sharded tensors (FSDP2's
DTensors): then a `Shards` (``shards=``) finishes every per-tensor sum across the ranks, the
only place where a step communicates.
"""

import array_api_compat.torch as compat_torch
import torch

from ..core import FTPState, SPDStatistics, damp_radius_gradient, decay_ratio, decay_strength, radius_update
from ..core import mars_shape as core_mars_shape
from ..core.ftp import NORM_EPS
from . import _triton_ops

xp = compat_torch

# -- reductions ---------------------------------------------------------------------------
#
# Every reduction here gives the same bits for any torch.get_num_threads(): ATen splits a sum to
# one number among threads (a two-pass reduction whose partial sums follow the thread count),
# but a sum to several outputs only among the outputs, each summed by one thread. So a CPU sum
# to one number is taken as fixed-size chunks first (`total`). Sums of 16-bit tensors
# accumulate in float32 and return float32 (ALGORITHMS.md §9: statistics in at least float32).

#: Values per chunk of a CPU sum to one number: below ATen's grain size (32768), so one thread
#: sums each chunk, whatever the thread count.
CHUNK = 1 << 14


def statistics_dtype(dtype):
    """The dtype of FTP's and SPD's statistics for tensors of ``dtype``: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def mars_shape(x):
    """The shape of ``core.mars_norm(x)``: ``(d0, 1, …, 1)``, ``(1,)`` for a vector, ``()`` for a scalar."""
    return core_mars_shape(x.shape)


def total(x):
    """``Σ x`` over the whole tensor, a 0-d tensor of `statistics_dtype`.

    On the CPU the sum is taken over chunks of `CHUNK` values first, so that it does not depend
    on the thread count; elsewhere it is one ``sum``.
    """
    dtype = statistics_dtype(x.dtype)
    flat = x.reshape(-1)
    n = flat.numel()
    if x.device.type != "cpu" or n <= CHUNK:
        return flat.sum(dtype=dtype)
    whole = n - n % CHUNK
    partial = total(flat[:whole].view(-1, CHUNK).sum(1, dtype=dtype))
    return partial + flat[whole:].sum(dtype=dtype) if whole < n else partial


def row_sum(x):
    """The MARS reduction of ``x`` (``core.norms._row_sum``): the sum over every axis but the first.

    Of `statistics_dtype`, a new tensor; a single row (a vector, or one row of a matrix) is
    summed by `total`.
    """
    if x.ndim == 0:
        return x.to(statistics_dtype(x.dtype), copy=True)
    if x.ndim == 1 or x.shape[0] == 1:
        return total(x).reshape(mars_shape(x))
    return x.sum(dim=tuple(range(1, x.ndim)), keepdim=True, dtype=statistics_dtype(x.dtype))


def _widened(x):
    """``x`` itself if it is at least float32, else a float32 copy (16-bit products underflow)."""
    dtype = statistics_dtype(x.dtype)
    return x if x.dtype == dtype else x.to(dtype)


def dot(a, b, scratch=None):
    """``⟨a, b⟩``, the sum of ``a ⊙ b`` over the whole tensor, a 0-d tensor of `statistics_dtype`.

    On the CPU, the C kernels' ``dot`` where it takes the tensors (contiguous float32, float64
    or bfloat16, outside a trace), else the product into ``scratch`` (a `Scratch`) when given,
    summed by `total`; elsewhere ``torch.dot`` (MKL's, on the CPU, splits its sum by the thread
    count).
    """
    if kernels_take([a, b]):
        value = _kernels.dot(
            _KERNEL_DTYPES[a.dtype], a.data_ptr(), b.data_ptr(), a.numel(), torch.get_num_threads()
        )
        return torch.tensor(value, dtype=statistics_dtype(a.dtype), device="cpu")
    a, b = _widened(a), _widened(b)
    if a.device.type != "cpu":
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return total(torch.mul(a, b, out=None if scratch is None else scratch.like(a)))


def norms(tensors, scratch=None):
    """``‖x‖₂`` of each tensor, stacked into a vector of `statistics_dtype`."""
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, dtype=statistics_dtype(tensors[0].dtype)))
    return torch.sqrt(torch.stack([dot(x, x, scratch) for x in tensors]))


def squared_norms(tensors, scratch=None):
    """``‖x‖₂²`` of each tensor, stacked into a vector of `statistics_dtype`: sums that add up across shards."""
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, dtype=statistics_dtype(tensors[0].dtype))).square()
    return torch.stack([dot(x, x, scratch) for x in tensors])


def _largest(x):
    """``max x``, or 0 for an empty shard (the norms it is compared with are positive)."""
    return x.max() if x.numel() else x.new_zeros(())


class Shards:
    """The collectives that finish a bucket's per-tensor sums when its tensors are shards.

    The steps run on the local shards of sharded tensors (``DTensor.to_local()``); a sum over
    a whole tensor (``⟨g, c⟩``, ``‖c‖²``, ``∇γ``) is then a partial sum on each rank, and so is
    a MARS row sum where the tensor is split along an axis that MARS sums over. ``layouts[i]``
    is ``(whole, rows)`` for the bucket's tensor ``i``: the process groups across which its
    whole-tensor sums are partial (every mesh dimension that shards it), and those across which
    its row sums are (a mesh dimension that splits a vector, or a matrix along another axis
    than its rows). Each call makes one all-reduce per process group (and dtype), whatever the
    number of tensors; a tensor sharded along two mesh dimensions is reduced along one, then
    the other.
    """

    def __init__(self, layouts):
        self.layouts = layouts

    def sums(self, whole=None, rows=None):
        """``(whole, rows)`` summed across the ranks that hold parts of each tensor.

        ``whole`` is ``None`` or has one entry per tensor along its first axis (a sum over the
        whole tensor, or a few); ``rows`` is ``None`` or a list of each tensor's MARS row sums.
        """
        pieces = []
        if whole is not None:
            pieces += [(w, groups) for w, (groups, _) in zip(whole.unbind(0), self.layouts, strict=True)]
        if rows is not None:
            pieces += [(r, groups) for r, (_, groups) in zip(rows, self.layouts, strict=True)]
        values = self._all_reduce(pieces, "sum")
        if whole is not None:
            whole, values = torch.stack(values[: len(self.layouts)]), values[len(self.layouts) :]
        return whole, None if rows is None else values

    def largest(self, values):
        """The largest of each tensor's local maxima (a vector) across the ranks that hold its rows."""
        return torch.stack(self._all_reduce(list(zip(values.unbind(0), (w for w, _ in self.layouts))), "max"))

    @staticmethod
    def _all_reduce(pieces, op):
        """Each ``(tensor, groups)`` reduced across its groups in turn, a flat buffer per group and dtype."""
        import torch.distributed as dist

        op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        values = [value for value, _ in pieces]
        for turn in range(max((len(groups) for _, groups in pieces), default=0)):
            batches = {}
            for i, (_, groups) in enumerate(pieces):
                if turn < len(groups):
                    batches.setdefault((groups[turn], values[i].dtype), []).append(i)
            for (group, _), indices in batches.items():
                flat = torch.cat([values[i].reshape(-1) for i in indices])
                dist.all_reduce(flat, op=op, group=group)
                parts = flat.split([values[i].numel() for i in indices])
                for i, part in zip(indices, parts, strict=True):
                    values[i] = part.view(values[i].shape)
        return values


def advance_steps_(steps, dtype):
    """Add 1 to each tensor's step count (0-d tensors) in place; return the counts ``t`` as a vector of ``dtype``.

    On the CPU one C call (`_kernels.scalars`) instead of a dispatch per tensor.
    """
    taken = _scalar_addresses(steps)
    if taken is None or taken[0] == _SCALAR_CODES[torch.bool] or dtype not in _VECTOR_CODES:
        torch._foreach_add_(steps, 1)
        return torch.stack(steps).to(dtype)
    t = torch.empty(len(steps), dtype=dtype, device="cpu")
    _kernels.scalars(*taken, _VECTOR_CODES[dtype], t.data_ptr(), 2)
    torch.autograd.graph.increment_version(steps)
    return t


class Scalars:
    """0-d tensors (one per parameter tensor: radii, SPD's records) read as a vector and written back.

    On the CPU through `_kernels.scalars`, their addresses taken once for both, in one C call each
    way; elsewhere ``torch.stack`` and ``torch._foreach_copy_``.
    """

    def __init__(self, tensors):
        self.tensors = tensors
        self.taken = _scalar_addresses(tensors)

    def read(self, dtype):
        """``torch.stack(tensors).to(dtype)``."""
        if self.taken is None or dtype not in _VECTOR_CODES:
            return torch.stack(self.tensors).to(dtype)
        out = torch.empty(len(self.tensors), dtype=dtype, device="cpu")
        _kernels.scalars(*self.taken, _VECTOR_CODES[dtype], out.data_ptr(), 0)
        return out

    def write_(self, values):
        """``tensors[i].copy_(values[i])`` from a vector (or a matrix whose rows follow one another)."""
        plain = type(values) in _PLAIN and values.is_cpu and values.is_contiguous()
        if (
            self.taken is None
            or not plain
            or values.dtype not in _VECTOR_CODES
            or values.numel() != len(self.tensors)
        ):
            torch._foreach_copy_(self.tensors, list(values.reshape(-1).unbind(0)))
            return
        _kernels.scalars(*self.taken, _VECTOR_CODES[values.dtype], values.data_ptr(), 1)
        torch.autograd.graph.increment_version(self.tensors)


# -- base steps (ALGORITHMS.md §3) --------------------------------------------------------


def adam_moments(grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, beta1, beta2, amsgrad):
    """Update ``m`` and ``v`` (and ``v*``) in place; return the second moments the step divides by."""
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        return max_exp_avg_sqs
    return exp_avg_sqs


def add_scaled_(targets, tensors, alpha):
    """``x ← x + α·y`` in place for each pair, ``α`` a float or a 0-d tensor."""
    if isinstance(alpha, torch.Tensor):
        torch._foreach_addcmul_(targets, tensors, [alpha] * len(tensors))
    else:
        torch._foreach_add_(targets, tensors, alpha=alpha)


#: Values per block of `row_blocks`: 1 MiB of float32, within one core's L2 cache.
BLOCK = 1 << 18


def row_blocks(*tensors):
    """Views of same-shaped tensors, a few whole rows (first axis) at a time, about `BLOCK` values each.

    A CPU step runs several ops on each block while it is in cache, so that an intermediate
    (Adam's denominator, ``|c|``, ``g ⊙ c_prev``) is read back from the cache, not from
    memory. One block (the tensors themselves) when they are small, not contiguous, not on
    the CPU (an accelerator wants few, large kernels), or have fewer than two axes (MARS
    sums a vector whole). ``None`` entries stay ``None`` in every block.
    """
    x = tensors[0]
    small = x.numel() <= BLOCK or x.ndim < 2 or x.device.type != "cpu"
    if small or not all(t is None or t.is_contiguous() for t in tensors):
        return [tensors]
    rows = max(1, BLOCK // (x.numel() // x.shape[0]))
    return [
        tuple(None if t is None else t.narrow(0, start, min(rows, x.shape[0] - start)) for t in tensors)
        for start in range(0, x.shape[0], rows)
    ]


class Scratch:
    """A reusable buffer per (device, dtype) for Adam's denominator on the CPU.

    ``torch.optim.AdamW(foreach=True)`` makes its denominators as fresh full-size tensors
    at every step; on the CPU, whether ``malloc`` hands back the same pages or new ones
    (a page fault per 4 KiB, 83,000 per ViT-B/16 step, slower than the arithmetic) depends
    on the process's allocation history, so the step time of the same code doubles from one
    process to the next. A step that writes each tensor's denominator into one buffer, the
    size of the largest tensor, never allocates. It is not state: nothing in it outlives
    the tensor's update.
    """

    def __init__(self):
        self._buffers = {}

    def like(self, x, slot=0):
        """A tensor shaped like ``x`` (contents undefined), a view of buffer ``slot``.

        Two views of the same slot share memory: a caller that needs two temporaries at once
        takes them from two slots.
        """
        key = (x.device, x.dtype, slot)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < x.numel():
            buffer = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
            self._buffers[key] = buffer
        return buffer[: x.numel()].view(x.shape)


def adam_update_(targets, exp_avgs, second, t, *, lr, beta1, beta2, eps):
    r"""Subtract Adam's direction from ``targets`` in place: ``x ← x − lr · m / D`` (ALGORITHMS.md §3).

    .. math:: D = (\sqrt{v^*} / \sqrt{1 - \beta_2^t} + \epsilon)(1 - \beta_1^t)
              = \sqrt{v^*} \cdot \frac{1 - \beta_1^t}{\sqrt{1 - \beta_2^t}} + \epsilon (1 - \beta_1^t)

    ``t`` is the vector of per-tensor step counts; the bias corrections stay on the device,
    and both factors are of order one, so nothing overflows in float16. ``D`` is one
    multi-tensor temporary, as in ``torch.optim.AdamW(foreach=True)`` (the CPU's single
    pass, below, writes it into a `Scratch` a block at a time instead).

    A tensor ``lr`` is folded into ``D`` (``x ← x − m / (D / lr)``), so that it stays on the
    device; ``lr = 0`` makes ``D / lr`` infinite (a zero step), never ``0 · ∞``.
    """
    scale, offset, value = adam_coefficients(t, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    denominators = torch._foreach_sqrt(second)
    torch._foreach_mul_(denominators, scale.unbind(0))
    torch._foreach_add_(denominators, offset.unbind(0))
    torch._foreach_addcdiv_(targets, exp_avgs, denominators, value=value)


def adam_coefficients(t, *, lr, beta1, beta2, eps):
    """``(scale, offset, value)`` of `adam_update_`: ``x ← x + value · m / (√v* · scale + offset)``.

    ``scale`` and ``offset`` are vectors (one entry per tensor, from the step counts ``t``);
    a tensor ``lr`` is folded into them (``value = −1``), a float one is ``value = −lr``.
    """
    bias_correction1 = 1 - beta1**t
    scale = bias_correction1 / torch.sqrt(1 - beta2**t)
    offset = eps * bias_correction1
    if not isinstance(lr, torch.Tensor):
        return scale, offset, -lr
    moving = lr > 0
    safe = torch.where(moving, lr, torch.ones_like(lr))
    scale = torch.where(moving, scale / safe, torch.zeros_like(scale))
    offset = torch.where(moving, offset / safe, torch.full_like(offset, float("inf")))
    return scale, offset, -1.0


def adam_block_moments_(g, m, v, v_max, *, beta1, beta2, amsgrad):
    """`adam_moments` for one tensor (or block): ``m``, ``v`` (and ``v*``) in place; returns ``v*`` or ``v``."""
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if amsgrad:
        torch.maximum(v_max, v, out=v_max)
        return v_max
    return v


def adam_block_update_(x, m, second, scale, offset, value, scratch):
    """``x ← x + value · m / D`` for one tensor (or block), ``D = √v* · scale + offset`` in ``scratch``."""
    denominator = torch.sqrt(second, out=scratch.like(second))
    denominator.mul_(scale).add_(offset)  # (an addcmul with two 0-d operands measured 2x slower)
    x.addcdiv_(m, denominator, value=value)


def sgd_updates(params, grads, buffers, t, *, momentum, dampening, weight_decay, nesterov):
    """The tensors ``u`` with SGD's direction ``d = lr · u`` (ALGORITHMS.md §3, PyTorch's form).

    Momentum buffers are updated in place; they start at zero, and the first step's
    ``b = u`` is ``b ← μ·0 + 1·u`` (the coefficient of ``u`` is 1 where ``t == 1``).
    The result may alias ``grads`` or ``buffers``: read it, never write it.
    """
    updates = grads
    if weight_decay != 0:
        updates = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum == 0:
        return updates
    if dampening == 0 and buffers[0].device.type == "cpu":
        # one pass instead of two (the CPU has no multi-tensor kernels to lose)
        for b, u in zip(buffers, updates, strict=True):
            torch.add(u, b, alpha=momentum, out=b)
    elif dampening == 0:
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, updates)
    else:
        torch._foreach_mul_(buffers, momentum)
        one = torch.ones_like(t)
        coefficient = torch.where(t == 1, one, one * (1 - dampening)).unbind(0)
        torch._foreach_addcmul_(buffers, updates, coefficient)
    if not nesterov:
        return buffers
    if updates is grads:
        return torch._foreach_add(grads, buffers, alpha=momentum)
    torch._foreach_add_(updates, buffers, alpha=momentum)
    return updates


# -- FTP (ALGORITHMS.md §4) ---------------------------------------------------------------


def radius_gradients_(grads, prev_displacements, prev_inv_norms):
    r"""``∇γ = Σ rowdot(g, c_prev) ⊙ s_prev`` per tensor, a vector, not yet damped (`ftp_project_` damps it).

    Destroys ``prev_displacements`` (``c_prev ← g ⊙ c_prev`` in place, then summed per row,
    a block of rows at a time on the CPU): the caller writes this step's displacement into
    the same buffers next. 16-bit products are taken in float32.
    """
    values = []
    for g, c, s in zip(grads, prev_displacements, prev_inv_norms, strict=True):
        values.append(_sum([_radius_gradient_piece(g_b, c_b, s_b) for g_b, c_b, s_b in row_blocks(g, c, s)]))
    return torch.stack(values)


def _radius_gradient_piece(g, c, s):
    """``Σ rowdot(g, c) ⊙ s`` over a block of rows; ``c`` is overwritten with ``g ⊙ c`` when it is
    at least float32 (a 16-bit ``c`` is widened first)."""
    product = c.mul_(g) if c.dtype == statistics_dtype(c.dtype) else _widened(c).mul_(g)
    return total(row_sum(product) * s)


def displacements_into(buffers, params, anchors):
    """Write ``θ − θ₀`` (``θ`` for a zero anchor, ``anchor is None``) into ``buffers``; return them."""
    for buffer, param, anchor in zip(buffers, params, anchors, strict=True):
        if anchor is None:
            buffer.copy_(param)
        else:
            torch.sub(param, anchor, out=buffer)
    return buffers


def _mars_sums(displacement, param, scratch):
    """``MARS(c)``, the row sums of ``|c|``: ``|c|`` into ``scratch`` a block of rows at a time, else into ``param``."""
    if scratch is None:
        return row_sum(torch.abs(displacement, out=param))
    return _cat([row_sum(torch.abs(c, out=scratch.like(c))) for (c,) in row_blocks(displacement)])


def ftp_finish(params, anchors, displacements, radius_grads, t, states, *, k, scratch=None, shards=None):
    r"""FTP's projection after the base step, given ``c = θ̃ − θ₀`` per tensor (ALGORITHMS.md §4).

    ``n = MARS(c) + 1e-8``; the radii take one step of their own Adam (``core.radius_update``
    on the stacked scalars) on ``radius_grads`` (`radius_gradients_`); ``θ ← θ₀ + clip(γ / n,
    0, 1) ⊙ c``. ``states`` are the tensors' ``optimizer.state`` dicts: ``radius``, its moments
    and ``prev_inv_norm`` are updated in place, and ``prev_displacement`` must already be the
    buffer holding ``c``. ``|c|`` goes into ``scratch`` (a `Scratch`, on the CPU) a block of
    rows at a time, or else into the parameters, before they receive the projection: nothing
    full-size is allocated. ``shards``: a `Shards` when the tensors are local shards.
    """
    row_sums = [_mars_sums(c, p, scratch) for p, c in zip(params, displacements, strict=True)]
    ftp_project_(params, anchors, displacements, row_sums, radius_grads, t, states, k=k, shards=shards)


def ftp_after_step_(params, grads, anchors, states, t, *, k, scratch=None, shards=None):
    """The `FTP` wrapper's part of a step, after the wrapped optimizer's: ``∇γ``, ``c = θ̃ − θ₀``, the projection.

    ``states`` as in `ftp_finish`, their step counts already advanced to ``t``. On the CPU (with a
    ``scratch``) the C kernels take ``∇γ``, ``c`` and ``MARS(c)`` in one sweep where they take the tensors.
    """
    buffers = [s["prev_displacement"] for s in states]
    inv_norms = [s["prev_inv_norm"] for s in states]
    if _triton_ops.takes(params, grads, anchors, buffers, inv_norms):
        radius_grads, row_sums = _triton_ops.ftp_wrapper_sweeps(params, grads, anchors, states)
        ftp_project_(params, anchors, buffers, row_sums, radius_grads, t, states, k=k, shards=shards)
        return
    if scratch is not None and kernels_take(params, grads, anchors, buffers, rows=inv_norms):
        radius_grads, largest, row_sums = _ftp_displace_kernels(params, grads, anchors, buffers, inv_norms)
        ftp_project_(
            params, anchors, buffers, row_sums, radius_grads, t, states, k=k, shards=shards, largest=largest
        )
        return
    radius_grads = radius_gradients_(grads, buffers, inv_norms)
    displacements = displacements_into(buffers, params, anchors)
    ftp_finish(params, anchors, displacements, radius_grads, t, states, k=k, scratch=scratch, shards=shards)


def radius_step_(states, radius_grads, max_norms, t):
    """The radii's own Adam and clip (``core.radius_update`` on the stacked scalars), in place.

    ``states`` are the tensors' ``optimizer.state`` dicts, whose ``radius`` and moments are
    updated; ``max_norms`` is ``max n`` of each tensor. Returns the new radii, a vector.
    """
    # the three keys' scalars as one (3, n) matrix: read and written by one C call each on the CPU
    scalars = Scalars([s[key] for key in ("radius", "radius_exp_avg", "radius_exp_avg_sq") for s in states])
    dtype = states[0]["radius"].dtype
    scalar_state = FTPState(
        *scalars.read(dtype).view(3, len(states)), prev_displacement=None, prev_inv_norm=None
    )
    updated = radius_update(scalar_state, radius_grads.to(dtype), max_norms, t.to(dtype), xp=xp)
    scalars.write_(torch.stack(updated))
    return updated[0]


def ftp_project_(
    params, anchors, displacements, row_sums, radius_grads, t, states, *, k, shards=None, largest=None
):
    """`ftp_finish` given each tensor's row sums ``MARS(c)`` and undamped ``∇γ`` (a vector).

    With ``shards`` (a `Shards`), both are this rank's partial sums: they are summed across
    the ranks first, and ``max n`` taken across them, before ``n = MARS(c) + 1e-8``, the
    damping of ``∇γ``, the radius step and the projection. ``largest``: each tensor's largest
    row sum where the C sweeps took it (unsharded tensors, which the kernels then project).
    ``max n = max MARS(c) + 1e-8``: adding 1e-8 rounds monotonically, so it is the largest ``n``.
    """
    kernels = largest is not None and shards is None
    if shards is not None:
        radius_grads, row_sums = shards.sums(radius_grads, row_sums)
    if not kernels:
        largest = torch.stack([_largest(r) for r in row_sums])
    if shards is not None:
        largest = shards.largest(largest)
    max_norms = largest + NORM_EPS
    radius_grads = damp_radius_gradient(radius_grads, k, xp=xp)
    radii = radius_step_(states, radius_grads, max_norms, t)
    inv_norms = [s["prev_inv_norm"] for s in states]
    if not kernels:
        norm_list = [r + NORM_EPS for r in row_sums]
        if _triton_ops.takes(params, anchors, displacements, norm_list, inv_norms):
            _triton_ops.project_(params, anchors, displacements, norm_list, radii, inv_norms)
            return
    # the C sweeps checked these tensors (the row sums they wrote are made like `inv_norms`)
    if kernels or kernels_take(params, anchors, displacements, rows=(row_sums, inv_norms)):
        _ftp_project_kernels_(params, anchors, displacements, row_sums, radii, states)
        return
    for param, anchor, c, n, radius, state in zip(
        params, anchors, displacements, norm_list, radii.unbind(0), states, strict=True
    ):
        scale = torch.clamp(radius.to(n.dtype) / n, 0.0, 1.0)
        if anchor is None:
            torch.mul(c, scale, out=param)
        else:
            torch.addcmul(anchor, c, scale, out=param)
        torch.reciprocal(n, out=state["prev_inv_norm"])


# -- SPD (ALGORITHMS.md §5) ---------------------------------------------------------------


def spd_statistics(alignment, squared_distance, new_squared_distance, shards=None):
    """``(⟨g, θ − θ₀⟩, ‖θ − θ₀‖₂, ‖θ̃ − θ₀‖₂)`` per tensor from the sums, finished across ranks by ``shards``."""
    if shards is not None:
        sums, _ = shards.sums(torch.stack([alignment, squared_distance, new_squared_distance], 1))
        alignment, squared_distance, new_squared_distance = sums.unbind(1)
    return alignment, torch.sqrt(squared_distance), torch.sqrt(new_squared_distance)


def spd_keep(alignment, distance, new_distance, weight_decay, record=None):
    r"""``1 − λ r`` where the condition ``c = −⟨g, θ − θ₀⟩ < 0`` holds, else 1; a vector.

    ``λ r`` is ``core.decay_strength`` on the stacked per-tensor scalars. ``record``, one state
    dict per tensor holding 0-d ``spd_ratio`` and ``spd_decayed`` tensors, receives this step's
    ratio ``r`` and whether the condition held (the optimizers' diagnostics).
    """
    if record is not None:
        Scalars([s["spd_ratio"] for s in record]).write_(decay_ratio(new_distance, distance, xp=xp))
        Scalars([s["spd_decayed"] for s in record]).write_(alignment > 0)
    return 1 - decay_strength(SPDStatistics(alignment, distance), new_distance, weight_decay, xp=xp)


def spd_decay_(params, anchors, keep):
    """``θ ← θ₀ + keep · (θ̃ − θ₀)`` in place, the parameters holding ``θ̃ − θ₀``; ``keep`` is `spd_keep`.

    A bucket has one anchor mode: ``anchors`` are all ``θ₀`` or all ``None`` (zero anchors).
    16-bit tensors are decayed in float32: ``keep`` (``1 − λr``, often within 1e-3 of 1) would
    round to 1 in bfloat16.
    """
    if params[0].dtype != statistics_dtype(params[0].dtype):
        for p, anchor, factor in zip(params, anchors, keep.unbind(0), strict=True):
            decayed = _widened(p).mul_(factor)
            p.copy_(decayed if anchor is None else decayed.add_(anchor))
        return
    if anchors[0] is None:
        torch._foreach_mul_(params, keep.unbind(0))
        return
    for p, anchor, factor in zip(params, anchors, keep.unbind(0), strict=True):
        torch.addcmul(anchor, p, factor, out=p)


def spd_measure(params, anchors, grads=None, scratch=None):
    """``(⟨g, θ − θ₀⟩, ‖θ − θ₀‖₂²)`` per tensor, stacked; the alignment is ``None`` without ``grads``.

    ``θ − θ₀`` (``θ`` for a zero anchor, ``anchors`` entries ``None``) is made a block of rows
    at a time (into ``scratch``, a `Scratch`, on the CPU), never for every tensor at once: the
    `SPD` wrapper's statistics cost one tensor's (on the CPU, one block's) temporaries.
    """
    if _triton_ops.takes(params, anchors, grads or [None]):
        return _triton_ops.spd_measures(params, anchors, grads)
    if scratch is not None and kernels_take(params, anchors, grads or [None]):
        return _spd_sums_kernels(params, anchors, grads)
    alignments, squares = [], []
    for i, (p, a) in enumerate(zip(params, anchors, strict=True)):
        g = None if grads is None else grads[i]
        aligned, squared = [], []
        for p_b, a_b, g_b in row_blocks(p, a, g):
            c_b = p_b
            if a_b is not None:
                c_b = torch.sub(p_b, a_b, out=None if scratch is None else scratch.like(p_b, slot=1))
            if g_b is not None:
                aligned.append(dot(g_b, c_b, scratch))
            squared.append(dot(c_b, c_b, scratch))
        if grads is not None:
            alignments.append(_sum(aligned))
        squares.append(_sum(squared))
    alignment = torch.stack(alignments) if grads is not None else None
    return alignment, torch.stack(squares)


def decay_toward_anchors_(params, anchors, strength):
    """``θ̃ ← (1 − λr) θ̃ + λr θ₀`` in place (``core.decay_toward_anchor``), ``λr`` a vector per tensor.

    The parameters hold ``θ̃``; no temporary for full-precision tensors, 16-bit ones in float32.
    """
    if _triton_ops.takes(params, anchors):
        _triton_ops.decay_(params, anchors, 1 - strength, wrapper=True)
        return
    if kernels_take(params, anchors):
        _spd_decay_kernels_(params, anchors, strength)
        return
    # a tensor with λr = 0 keeps θ̃ (read on the host only where that costs no wait)
    decays = [True] * len(params)
    if strength.device.type == "cpu" and not torch.compiler.is_compiling():
        decays = [s != 0 for s in strength.tolist()]
    for p, anchor, s, decays_ in zip(params, anchors, strength.unbind(0), decays, strict=True):
        if not decays_:
            continue
        if p.dtype != statistics_dtype(p.dtype):
            decayed = _widened(p).mul_(1 - s)
            p.copy_(decayed if anchor is None else decayed.add_(_widened(anchor).mul_(s)))
        elif anchor is None:
            p.mul_(1 - s)
        else:
            p.mul_(1 - s).addcmul_(anchor, s)


# -- whole steps of one bucket --------------------------------------------------------------


def adam_ftp_step_(
    params,
    grads,
    moments,
    anchors,
    ftp_states,
    t,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    amsgrad,
    k,
    scratch=None,
    shards=None,
):
    """One Adam-FTP step of a bucket, in place (ALGORITHMS.md §3, §4).

    ``moments`` is ``(exp_avgs, exp_avg_sqs, max_exp_avg_sqs)``. ``anchors is None``: the
    bucket is unanchored and takes the plain AdamW step; otherwise one ``θ₀`` per tensor (or
    ``None`` per tensor for a zero anchor), and ``ftp_states`` are dicts holding ``radius``,
    ``radius_exp_avg``, ``radius_exp_avg_sq``, ``prev_displacement`` and ``prev_inv_norm``.
    With a ``scratch`` (a `Scratch`: CPU tensors) the step is the CPU's single pass. With
    ``shards`` (a `Shards`) the tensors are the local shards of sharded tensors.
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
    if anchors is not None:
        displacements = [s["prev_displacement"] for s in ftp_states]
        inv_norms = [s["prev_inv_norm"] for s in ftp_states]
        lists = (params, grads, *_adam_moments_taken(moments, amsgrad), anchors, displacements, inv_norms)
        if _triton_ops.takes(*lists, lr=lr):
            scale, offset, value = adam_coefficients(t, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
            radius_grads, row_sums = _triton_ops.adam_ftp_sweeps(
                params, grads, moments, anchors, ftp_states, scale, offset, value,
                beta1=beta1, beta2=beta2, amsgrad=amsgrad, lrwd=-lr * weight_decay,
            )  # fmt: skip
            ftp_project_(
                params, anchors, displacements, row_sums, radius_grads, t, ftp_states, k=k, shards=shards
            )
            return
    if scratch is not None:
        _adam_ftp_blocks_(
            params, grads, moments, anchors, ftp_states, t, k=k, scratch=scratch, shards=shards, **hyper
        )
        return
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs = moments
    second = adam_moments(
        grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, beta1=beta1, beta2=beta2, amsgrad=amsgrad
    )
    adam = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    if anchors is None:
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        adam_update_(params, exp_avgs, second, t, **adam)
        return
    buffers = [s["prev_displacement"] for s in ftp_states]
    radius_grads = radius_gradients_(grads, buffers, [s["prev_inv_norm"] for s in ftp_states])
    if weight_decay != 0:
        # θ − lr·wd·θ in place: the parameters are only read again for c, then overwritten
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    displacements = displacements_into(buffers, params, anchors)
    adam_update_(displacements, exp_avgs, second, t, **adam)
    ftp_finish(params, anchors, displacements, radius_grads, t, ftp_states, k=k, shards=shards)


def sgd_ftp_step_(
    params,
    grads,
    buffers,
    anchors,
    ftp_states,
    t,
    *,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    k,
    scratch=None,
    shards=None,
):
    """One SGD-FTP step of a bucket, in place (ALGORITHMS.md §3, §4); ``buffers``: momentum buffers.

    ``anchors``, ``ftp_states``, ``scratch`` and ``shards`` as in `adam_ftp_step_`.
    """
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    if anchors is not None:
        displacements = [s["prev_displacement"] for s in ftp_states]
        inv_norms = [s["prev_inv_norm"] for s in ftp_states]
        momentum_buffers = buffers if momentum != 0 else [None] * len(params)
        if _triton_ops.takes(params, grads, momentum_buffers, anchors, displacements, inv_norms, lr=lr):
            one = torch.ones_like(t)
            coefficients = torch.where(t == 1, one, one * (1 - dampening))  # b = u on the first step
            radius_grads, row_sums = _triton_ops.sgd_ftp_sweeps(
                params, grads, momentum_buffers, anchors, ftp_states, coefficients,
                lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
            )  # fmt: skip
            ftp_project_(
                params, anchors, displacements, row_sums, radius_grads, t, ftp_states, k=k, shards=shards
            )
            return
    if scratch is not None and anchors is not None:
        if kernels_take(params, grads, buffers, anchors, displacements, rows=inv_norms):
            _sgd_ftp_kernels_(params, grads, buffers, anchors, ftp_states, t, **hyper, k=k, shards=shards)
            return
    if scratch is not None:
        _sgd_ftp_blocks_(
            params, grads, buffers, anchors, ftp_states, t, **hyper, k=k, scratch=scratch, shards=shards
        )
        return
    if anchors is not None:
        radius_grads = radius_gradients_(grads, displacements, inv_norms)
    updates = sgd_updates(
        params,
        grads,
        buffers,
        t,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )
    if anchors is None:
        add_scaled_(params, updates, -lr)
        return
    displacements = displacements_into(displacements, params, anchors)
    add_scaled_(displacements, updates, -lr)
    del updates
    ftp_finish(params, anchors, displacements, radius_grads, t, ftp_states, k=k, shards=shards)


def adam_spd_step_(
    params,
    grads,
    moments,
    anchors,
    t,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    amsgrad,
    scratch=None,
    shards=None,
    record=None,
):
    """One Adam-SPD step of a bucket, in place (ALGORITHMS.md §3, §5).

    ``anchors``, ``scratch`` and ``shards`` as in `adam_ftp_step_` (``anchors=None``: the plain
    Adam step, no decay); ``record`` as in `spd_keep`. The parameters themselves hold ``θ − θ₀``
    until the end of the step: no full-size temporary beyond Adam's denominator.
    """
    if anchors is not None and _triton_ops.takes(
        params, grads, *_adam_moments_taken(moments, amsgrad), anchors, lr=lr
    ):
        scale, offset, value = adam_coefficients(t, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
        sums = _triton_ops.adam_spd_sweeps(
            params, grads, moments, anchors, scale, offset, value, beta1=beta1, beta2=beta2, amsgrad=amsgrad
        )
        statistics = spd_statistics(*sums.unbind(1), shards)
        _triton_ops.decay_(params, anchors, spd_keep(*statistics, weight_decay, record), wrapper=False)
        return
    if scratch is not None:
        _adam_spd_blocks_(
            params, grads, moments, anchors, t, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad, scratch=scratch, shards=shards, record=record,
        )  # fmt: skip
        return
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs = moments
    second = adam_moments(
        grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, beta1=beta1, beta2=beta2, amsgrad=amsgrad
    )
    adam = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    if anchors is None:
        adam_update_(params, exp_avgs, second, t, **adam)
        return
    if anchors[0] is not None:
        torch._foreach_sub_(params, anchors)
    alignment = torch.stack([dot(g, p) for g, p in zip(grads, params, strict=True)])
    if shards is None:
        distance = norms(params)
        adam_update_(params, exp_avgs, second, t, **adam)
        spd_decay_(params, anchors, spd_keep(alignment, distance, norms(params), weight_decay, record))
        return
    # the squares, which add up across shards, and one collective for the three sums
    squared_distance = squared_norms(params)
    adam_update_(params, exp_avgs, second, t, **adam)
    statistics = spd_statistics(alignment, squared_distance, squared_norms(params), shards)
    spd_decay_(params, anchors, spd_keep(*statistics, weight_decay, record))


# -- the CPU's single pass ------------------------------------------------------------------
#
# On the CPU a step is bound by memory traffic, and an op sequence reads and writes every
# tensor once per op. The functions below make one pass over each tensor, a block of rows
# at a time (`row_blocks`), running every op of the step on the block while it is in cache:
# Adam's moments, the statistics, the base step and the norm of the result; only the part
# that needs a whole-tensor scalar (the decay, the projection) takes a second pass.


def _sum(pieces):
    return pieces[0] if len(pieces) == 1 else torch.stack(pieces).sum(0)


def _cat(pieces):
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _ftp_project_blocks_(params, anchors, ftp_states, radius_grads, row_sums, t, k, shards):
    """The second pass of the FTP steps: the radii's Adam on the stacked scalars, then the projection."""
    displacements = [state["prev_displacement"] for state in ftp_states]
    ftp_project_(
        params, anchors, displacements, row_sums, torch.stack(radius_grads), t, ftp_states, k=k, shards=shards
    )


def _adam_spd_blocks_(
    params,
    grads,
    moments,
    anchors,
    t,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    amsgrad,
    scratch,
    shards,
    record,
):
    """`adam_spd_step_` on the CPU: ``⟨g, θ − θ₀⟩``, ``‖θ − θ₀‖²``, the Adam step and ``‖θ̃ − θ₀‖²`` in one pass."""
    scale, offset, value = adam_coefficients(t, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    anchored = anchors is not None
    if anchored and kernels_take(params, grads, *_adam_moments_taken(moments, amsgrad), anchors):
        sums = _adam_spd_kernels_(
            params, grads, moments, anchors, scale, offset, value, beta1, beta2, amsgrad
        )
        statistics = spd_statistics(*sums.unbind(1), shards)
        _adam_spd_decay_kernels_(params, anchors, spd_keep(*statistics, weight_decay, record))
        return
    sums = []
    for i, (p, g, m, v, v_max) in enumerate(zip(params, grads, *moments, strict=True)):
        anchor = anchors[i] if anchored else None
        pieces = []
        for p_b, g_b, m_b, v_b, v_max_b, a_b in row_blocks(p, g, m, v, v_max, anchor):
            second = adam_block_moments_(g_b, m_b, v_b, v_max_b, beta1=beta1, beta2=beta2, amsgrad=amsgrad)
            if anchored:
                if a_b is not None:
                    p_b.sub_(a_b)  # the parameters hold θ − θ₀ until the decay
                before = (dot(g_b, p_b, scratch), dot(p_b, p_b, scratch))
            adam_block_update_(p_b, m_b, second, scale[i], offset[i], value, scratch)
            if anchored:
                pieces.append(torch.stack([*before, dot(p_b, p_b, scratch)]))
        if anchored:
            sums.append(_sum(pieces))
    if not anchored:
        return
    statistics = spd_statistics(*torch.stack(sums).unbind(1), shards)
    spd_decay_(params, anchors, spd_keep(*statistics, weight_decay, record))


def _adam_ftp_blocks_(
    params,
    grads,
    moments,
    anchors,
    ftp_states,
    t,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    amsgrad,
    k,
    scratch,
    shards,
):
    """`adam_ftp_step_` on the CPU: ``∇γ``, the Adam step, ``c`` and ``MARS(c)`` in one pass."""
    scale, offset, value = adam_coefficients(t, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    anchored = anchors is not None
    if anchored:
        displacements = [state["prev_displacement"] for state in ftp_states]
        inv_norms = [state["prev_inv_norm"] for state in ftp_states]
        taken = (params, grads, *_adam_moments_taken(moments, amsgrad), anchors, displacements)
        if kernels_take(*taken, rows=inv_norms):
            lrwd = -float(lr) * weight_decay
            adam = (scale, offset, value, beta1, beta2, amsgrad, lrwd)
            radius_grads, largest, row_sums = _adam_ftp_kernels_(
                params, grads, moments, anchors, ftp_states, adam
            )
            ftp_project_(
                params, anchors, displacements, row_sums, radius_grads, t, ftp_states,
                k=k, shards=shards, largest=largest,
            )  # fmt: skip
            return
    radius_grads, row_sums = [], []
    for i, (p, g, m, v, v_max) in enumerate(zip(params, grads, *moments, strict=True)):
        state = ftp_states[i] if anchored else {}
        anchor = anchors[i] if anchored else None
        c, s = state.get("prev_displacement"), state.get("prev_inv_norm")
        gradient_pieces, norm_pieces = [], []
        for p_b, g_b, m_b, v_b, v_max_b, a_b, c_b, s_b in row_blocks(p, g, m, v, v_max, anchor, c, s):
            second = adam_block_moments_(g_b, m_b, v_b, v_max_b, beta1=beta1, beta2=beta2, amsgrad=amsgrad)
            target = p_b
            if anchored:
                gradient_pieces.append(_radius_gradient_piece(g_b, c_b, s_b))
                if a_b is None:
                    c_b.copy_(p_b)
                else:
                    torch.sub(p_b, a_b, out=c_b)
                target = c_b
            if weight_decay != 0:
                add_scaled_([target], [p_b], -lr * weight_decay)
            adam_block_update_(target, m_b, second, scale[i], offset[i], value, scratch)
            if anchored:
                norm_pieces.append(row_sum(torch.abs(c_b, out=scratch.like(c_b))))
        if anchored:
            radius_grads.append(_sum(gradient_pieces))
            row_sums.append(_cat(norm_pieces))
    if anchored:
        _ftp_project_blocks_(params, anchors, ftp_states, radius_grads, row_sums, t, k, shards)


def _sgd_ftp_blocks_(
    params,
    grads,
    buffers,
    anchors,
    ftp_states,
    t,
    *,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    k,
    scratch,
    shards,
):
    """`sgd_ftp_step_` on the CPU: ``∇γ``, SGD's update, ``c`` and ``MARS(c)`` in one pass.

    ``u`` lives in ``scratch`` when it is not ``g`` or the momentum buffer itself.
    """
    anchored = anchors is not None
    one = torch.ones_like(t)
    coefficients = torch.where(t == 1, one, one * (1 - dampening))  # b = u on the first step
    radius_grads, row_sums = [], []
    for i, (p, g, b) in enumerate(zip(params, grads, buffers, strict=True)):
        state = ftp_states[i] if anchored else {}
        anchor = anchors[i] if anchored else None
        c, s = state.get("prev_displacement"), state.get("prev_inv_norm")
        gradient_pieces, norm_pieces = [], []
        for p_b, g_b, b_b, a_b, c_b, s_b in row_blocks(p, g, b, anchor, c, s):
            if anchored:
                gradient_pieces.append(_radius_gradient_piece(g_b, c_b, s_b))
            u = g_b
            if weight_decay != 0:
                u = torch.add(g_b, p_b, alpha=weight_decay, out=scratch.like(g_b))
            if momentum != 0:
                if dampening == 0:
                    torch.add(u, b_b, alpha=momentum, out=b_b)
                else:
                    b_b.mul_(momentum).addcmul_(u, coefficients[i])
                if nesterov:
                    u = torch.add(u, b_b, alpha=momentum, out=scratch.like(g_b))
                else:
                    u = b_b
            target = p_b
            if anchored:
                if a_b is None:
                    c_b.copy_(p_b)
                else:
                    torch.sub(p_b, a_b, out=c_b)
                target = c_b
            add_scaled_([target], [u], -lr)
            if anchored:
                norm_pieces.append(row_sum(torch.abs(c_b, out=scratch.like(c_b))))
        if anchored:
            radius_grads.append(_sum(gradient_pieces))
            row_sums.append(_cat(norm_pieces))
    if anchored:
        _ftp_project_blocks_(params, anchors, ftp_states, radius_grads, row_sums, t, k, shards)


# -- the C kernels --------------------------------------------------------------------------
#
# Where `adapters/_kernels.c` was compiled at install, a CPU step of SGD-FTP runs its SGD step,
# ∇γ, c and MARS(c) as one C loop over each tensor, and every FTP step its projection as
# another: eager PyTorch pays one sweep per op, even over a block in cache. The scalar rules
# (the radii's Adam, the damping) stay calls into the core, as above.

try:
    from . import _kernels
except ImportError:  # built without a C compiler: the single pass above does the same in PyTorch
    _kernels = None

_KERNEL_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}


def kernels_available(dtype):
    """Whether C kernels were built for tensors of ``dtype``."""
    return _kernels is not None and dtype in _KERNEL_DTYPES


def kernels_take(*tensor_lists, rows=()):
    """Whether the C kernels take these lists of tensors (``None`` entries allowed).

    They take CPU tensors, contiguous, non-empty and all of one dtype, float32, float64 or
    bfloat16, outside a traced step (a graph cannot call C through addresses). ``rows``: a list
    (or a tuple of lists) of per-row tensors (``prev_inv_norm``, ``n``), of `statistics_dtype`.
    """
    dtype = tensor_lists[0][0].dtype
    if not kernels_available(dtype) or torch.compiler.is_compiling():
        return False
    rows = rows if isinstance(rows, tuple) else (rows,)
    wanted = [(tensors, dtype) for tensors in tensor_lists] + [(r, statistics_dtype(dtype)) for r in rows]
    for tensors, want in wanted:  # a plain loop: this runs every step over every tensor
        for x in tensors:
            if x is not None and not (x.is_cpu and x.dtype == want and x.is_contiguous() and x.numel()):
                return False
    return True


def _ftp_sweep_outputs(inv_norms):
    """What an FTP sweep in C writes besides the tensors: the row sums ``MARS(c)`` (one per tensor,
    shaped as its ``prev_inv_norm``) and a float64 scratch row of the row dots. Allocated before the
    sweeps: once a tensor is updated, nothing can fail."""
    row_sums = [torch.empty_like(s) for s in inv_norms]
    return row_sums, torch.empty(max(s.numel() for s in inv_norms), dtype=torch.float64, device="cpu")


def _swept(swept, dtype):
    """The FTP sweeps' ``(∇γ, largest row sum)`` per tensor as two vectors of `statistics_dtype`."""
    return tuple(
        torch.tensor(values, dtype=statistics_dtype(dtype), device="cpu")
        for values in zip(*swept, strict=True)
    )


def _rows_cols(x):
    """``x`` as the C kernels see it: ``(rows, cols)``, MARS reducing each row (a vector is one row)."""
    rows = x.shape[0] if x.ndim >= 2 else 1
    return rows, x.numel() // rows


def _address(x):
    return 0 if x is None else x.data_ptr()


#: The dtype codes of `_kernels.scalars`: of the 0-d tensors, and of the vectors they are read into or from.
_SCALAR_CODES = {torch.float32: 0, torch.float64: 1, torch.bool: 3, torch.int64: 4, torch.int32: 5}
_VECTOR_CODES = {torch.float32: 0, torch.float64: 1, torch.bool: 3}
#: Tensors whose ``data_ptr()`` is their own memory (not a subclass: a DTensor's is not its values).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _scalar_addresses(tensors):
    """``(code, addresses)`` of one-value CPU tensors of one dtype for `_kernels.scalars`; ``None``
    where it cannot take them (no kernels, a traced step, another device or dtype, a subclass)."""
    if _kernels is None or not tensors or torch.compiler.is_compiling():
        return None
    dtype = tensors[0].dtype
    code = _SCALAR_CODES.get(dtype)
    if code is None:
        return None
    addresses = []
    for x in tensors:  # a plain loop: this runs every step over every tensor
        if not (type(x) in _PLAIN and x.is_cpu and x.dtype is dtype and x.numel() == 1):
            return None
        addresses.append(x.data_ptr())
    return code, addresses


def _ftp_project_kernels_(params, anchors, displacements, row_sums, radii, states):
    """The projection loop of `ftp_project_` in C, one call per tensor; ``radii`` from `radius_step_`,
    ``row_sums`` each tensor's ``MARS(c)`` (the kernel adds the norms' 1e-8)."""
    code = _KERNEL_DTYPES[params[0].dtype]
    threads = torch.get_num_threads()
    n_dtype = statistics_dtype(params[0].dtype)  # the radius as the kernel's arithmetic takes it
    inv_norms = [state["prev_inv_norm"] for state in states]
    for p, a, c, n, radius, s in zip(
        params, anchors, displacements, row_sums, radii.to(n_dtype).tolist(), inv_norms, strict=True
    ):
        rows, cols = _rows_cols(p)
        addresses = (p.data_ptr(), _address(a), c.data_ptr(), n.data_ptr(), s.data_ptr())
        _kernels.ftp_project(code, *addresses, radius, NORM_EPS, rows, cols, threads)
    # the kernels wrote through addresses: tell autograd, as an in-place op would have
    torch.autograd.graph.increment_version(params + inv_norms)


def _sgd_ftp_kernels_(
    params,
    grads,
    buffers,
    anchors,
    ftp_states,
    t,
    *,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    k,
    shards,
):
    """`sgd_ftp_step_` in C: one sweep per tensor (SGD, ``∇γ``, ``c``, ``MARS(c)``), then the projection's."""
    code = _KERNEL_DTYPES[params[0].dtype]
    threads = torch.get_num_threads()
    lr = float(lr)  # a 0-d tensor (Keras) is on the CPU here: reading it syncs nothing
    displacements = [state["prev_displacement"] for state in ftp_states]
    inv_norms = [state["prev_inv_norm"] for state in ftp_states]
    row_sums, dots = _ftp_sweep_outputs(inv_norms)
    swept = []
    for p, g, b, a, c, s, n, first in zip(
        params, grads, buffers, anchors, displacements, inv_norms, row_sums, (t == 1).tolist(), strict=True
    ):
        rows, cols = _rows_cols(p)
        coefficient = 1.0 if first else 1.0 - dampening  # b = u on the first step
        swept.append(_kernels.sgd_ftp_displace(
            code, p.data_ptr(), g.data_ptr(), _address(b if momentum != 0 else None), _address(a),
            c.data_ptr(), s.data_ptr(), n.data_ptr(), dots.data_ptr(), rows, cols, lr, momentum,
            coefficient, weight_decay, nesterov, threads,
        ))  # fmt: skip
    torch.autograd.graph.increment_version(displacements + [b for b in buffers if b is not None])
    radius_grads, largest = _swept(swept, params[0].dtype)
    ftp_project_(
        params, anchors, displacements, row_sums, radius_grads, t, ftp_states,
        k=k, shards=shards, largest=largest,
    )  # fmt: skip


def _adam_moments_taken(moments, amsgrad):
    """The moment lists the kernels read: ``m`` and ``v``, and ``v*`` with amsgrad."""
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs = moments
    return (exp_avgs, exp_avg_sqs, max_exp_avg_sqs) if amsgrad else (exp_avgs, exp_avg_sqs)


def _adam_addresses(g, m, v, v_max, amsgrad):
    return (g.data_ptr(), m.data_ptr(), v.data_ptr(), _address(v_max if amsgrad else None))


def _bump_moments(moments, amsgrad):
    """Tell autograd that the kernels wrote the moments (and ``v*``), as in-place ops would have."""
    torch.autograd.graph.increment_version([x for xs in _adam_moments_taken(moments, amsgrad) for x in xs])


def _adam_ftp_kernels_(params, grads, moments, anchors, ftp_states, adam):
    """`_adam_ftp_blocks_` in C: one sweep per tensor (Adam, ``∇γ``, ``c``, ``MARS(c)``).

    ``adam`` is ``(scale, offset, value, beta1, beta2, amsgrad, lrwd)``: `adam_coefficients`,
    the betas and ``−lr·wd``. Returns ``(∇γ, max MARS(c), MARS(c))`` (`_swept`).
    """
    scale, offset, value, beta1, beta2, amsgrad, lrwd = adam
    code = _KERNEL_DTYPES[params[0].dtype]
    threads = torch.get_num_threads()
    displacements = [state["prev_displacement"] for state in ftp_states]
    inv_norms = [state["prev_inv_norm"] for state in ftp_states]
    row_sums, dots = _ftp_sweep_outputs(inv_norms)
    swept = []
    for p, g, m, v, v_max, a, c, s, n, scale_i, offset_i in zip(
        params, grads, *moments, anchors, displacements, inv_norms, row_sums, scale.tolist(), offset.tolist(),
        strict=True,
    ):  # fmt: skip
        rows, cols = _rows_cols(p)
        swept.append(_kernels.adam_ftp_displace(
            code, p.data_ptr(), *_adam_addresses(g, m, v, v_max, amsgrad), _address(a), c.data_ptr(),
            s.data_ptr(), n.data_ptr(), dots.data_ptr(), rows, cols, beta1, beta2, scale_i, offset_i,
            float(value), lrwd, threads,
        ))  # fmt: skip
    torch.autograd.graph.increment_version(displacements)
    _bump_moments(moments, amsgrad)
    return *_swept(swept, params[0].dtype), row_sums


def _adam_spd_kernels_(params, grads, moments, anchors, scale, offset, value, beta1, beta2, amsgrad):
    """`_adam_spd_blocks_`'s sweep in C, one per tensor; returns the sums ``(⟨g, θ − θ₀⟩, ‖θ − θ₀‖²,
    ‖θ̃ − θ₀‖²)`` per tensor (rows of a matrix), the parameters holding ``θ̃ − θ₀``."""
    code = _KERNEL_DTYPES[params[0].dtype]
    threads = torch.get_num_threads()
    sums = []
    for p, g, m, v, v_max, a, scale_i, offset_i in zip(
        params, grads, *moments, anchors, scale.tolist(), offset.tolist(), strict=True
    ):
        sums.append(_kernels.adam_spd_step(
            code, p.data_ptr(), *_adam_addresses(g, m, v, v_max, amsgrad), _address(a), p.numel(),
            beta1, beta2, scale_i, offset_i, float(value), threads,
        ))  # fmt: skip
    torch.autograd.graph.increment_version(params)
    _bump_moments(moments, amsgrad)
    return torch.tensor(sums, dtype=statistics_dtype(params[0].dtype), device="cpu")


def _ftp_displace_kernels(params, grads, anchors, displacements, inv_norms):
    """`ftp_after_step_`'s sweep in C, one per tensor (``∇γ``, ``c``, ``MARS(c)``); returns
    ``(∇γ, max MARS(c), MARS(c))`` (`_swept`)."""
    code = _KERNEL_DTYPES[params[0].dtype]
    threads = torch.get_num_threads()
    row_sums, dots = _ftp_sweep_outputs(inv_norms)
    swept = []
    for p, g, a, c, s, n in zip(params, grads, anchors, displacements, inv_norms, row_sums, strict=True):
        rows, cols = _rows_cols(p)
        swept.append(_kernels.ftp_displace(
            code, p.data_ptr(), g.data_ptr(), _address(a), c.data_ptr(), s.data_ptr(), n.data_ptr(),
            dots.data_ptr(), rows, cols, threads,
        ))  # fmt: skip
    torch.autograd.graph.increment_version(displacements)
    return *_swept(swept, params[0].dtype), row_sums


def _spd_sums_kernels(params, anchors, grads):
    """`spd_measure` in C: one sweep per tensor, ``θ − θ₀`` never written."""
    code = _KERNEL_DTYPES[params[0].dtype]
    threads = torch.get_num_threads()
    sums = [
        _kernels.spd_sums(code, p.data_ptr(), _address(None if grads is None else grads[i]), _address(a),
                          p.numel(), threads)[:2]
        for i, (p, a) in enumerate(zip(params, anchors, strict=True))
    ]  # fmt: skip
    alignment, squares = torch.tensor(sums, dtype=statistics_dtype(params[0].dtype), device="cpu").unbind(1)
    return (None if grads is None else alignment), squares


def _spd_decay_kernels_(params, anchors, strength):
    """`decay_toward_anchors_` in C: ``θ ← θ·(1 − λr) + θ₀·λr``, one sweep per tensor that decays.

    A tensor with ``λr = 0`` (its gradient did not push it away, or its step moved it closer)
    keeps ``θ̃`` as it is: no sweep.
    """
    strength = strength.to(statistics_dtype(params[0].dtype))
    _decay_kernels_(params, anchors, (1 - strength).tolist(), strength.tolist(), skip_undecayed=True)


def _adam_spd_decay_kernels_(params, anchors, keep):
    """`spd_decay_` in C: ``θ ← θ₀ + keep · (θ̃ − θ₀)``, the parameters holding ``θ̃ − θ₀``; one sweep per tensor."""
    keep = keep.to(statistics_dtype(params[0].dtype)).tolist()
    _decay_kernels_(params, anchors, keep, [1.0] * len(params))


def _decay_kernels_(params, anchors, keeps, strengths, skip_undecayed=False):
    """``θ ← θ · keep + θ₀ · strength`` (no anchor: ``θ · keep``) in C, per tensor; with
    ``skip_undecayed``, a tensor whose strength is 0 is left as it is (no sweep)."""
    code = _KERNEL_DTYPES[params[0].dtype]
    threads = torch.get_num_threads()
    for p, a, keep, strength in zip(params, anchors, keeps, strengths, strict=True):
        if strength != 0 or not skip_undecayed:
            _kernels.spd_decay(code, p.data_ptr(), _address(a), keep, strength, p.numel(), threads)
    torch.autograd.graph.increment_version(params)
