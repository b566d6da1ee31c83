"""Triton kernels of the PyTorch adapter's CUDA steps (private).

On an accelerator a step is bound by memory traffic, as on the CPU, and the multi-tensor
(``torch._foreach_*``) path pays one full-size pass per op. Here each tensor's step is two
kernels, as in the C kernels of ``adapters/_kernels.c`` (ALGORITHMS.md §3–§5):

- a sweep that takes the base step (Adam or SGD) and every reduction the method needs
  (FTP: ``Σ c_prev ⊙ g`` and ``Σ |c|`` per MARS row; SPD: ``⟨g, θ − θ₀⟩``, ``‖θ − θ₀‖²``,
  ``‖θ̃ − θ₀‖²``), each program writing its partial sums to a small buffer;
- after the per-tensor scalar rules (the radii's Adam, the decay ratio: `tether.core` on the
  stacked scalars, on the device), the projection or the decay.

A tensor is seen as ``rows x cols`` (MARS reduces each row; SPD's sums are over one row). A
program takes ``BLOCK`` values of one row; the partial sums are added up by ``torch.sum`` over
a fixed shape, so a step gives the same bits every time. Every scalar a kernel needs from the
step count (Adam's bias corrections, the first step's momentum coefficient, the radius, the
decay's factor) is read from device memory: nothing synchronises the host. Arithmetic is in
float32 for 16-bit tensors (which are stored back in their dtype) and float64 for float64.

``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (Triton's interpreter); the tests
do that with `run_on_cpu` set, against the core in float64 and the PyTorch path in float32 and
bfloat16.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the multi-tensor path runs everywhere
    triton = None

#: Values per program.
BLOCK = 1024
#: Set by the tests under ``TRITON_INTERPRET=1``: CPU tensors take these kernels too.
run_on_cpu = False
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def available():
    """Whether Triton imported."""
    return triton is not None


def takes(*tensor_lists, lr=0.0):
    """Whether these kernels take the lists of tensors (``None`` entries allowed) and ``lr``.

    CUDA tensors (CPU ones with `run_on_cpu`), contiguous, non-empty and floating (each list
    may have its own dtype: the kernels load in the accumulator's and store in each tensor's),
    outside a traced step (``torch.compile`` fuses its own kernels); ``lr`` a float (a 0-d
    tensor learning rate keeps the multi-tensor path).
    """
    if triton is None or isinstance(lr, torch.Tensor) or torch.compiler.is_compiling():
        return False
    device = "cpu" if run_on_cpu else "cuda"
    return all(
        x is None or (x.device.type == device and x.dtype in _DTYPES and x.is_contiguous() and x.numel() > 0)
        for tensors in tensor_lists
        for x in tensors
    )


def _rows_cols(x, whole):
    if whole:
        return 1, x.numel()
    rows = x.shape[0] if x.ndim >= 2 else 1
    return rows, x.numel() // rows


def _accumulator(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


if triton is not None:

    @triton.jit
    def _store(ptr, x, mask):
        """Store ``x`` in ``ptr``'s dtype, rounding to nearest even (bfloat16 by hand: Triton's
        interpreter truncates its conversion, the compiled kernels round; this gives both the same bits)."""
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(ptr, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sweep_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, vm_ptr, a_ptr, c_ptr, b_ptr, sums_ptr, scale_ptr, offset_ptr, coef_ptr,
        hyper_ptr, cols, chunks,
        ADAM: tl.constexpr, SGD: tl.constexpr, FTP: tl.constexpr, AMSGRAD: tl.constexpr,
        ANCHOR: tl.constexpr, WD: tl.constexpr, HAS_G: tl.constexpr, SMALL: tl.constexpr,
        MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One block of one row: the base step and the partial sums (see the module's docstring).

        ADAM: m, v (v*) as torch.optim.Adam, u = value · m / (√v* · scale + offset). SGD: u =
        −lr · d, d from torch.optim.SGD's rule (coef: 1 on the first step, else 1 − dampening).
        FTP: S0 = Σ c_prev·g, c = (θ − θ₀) [+ lrwd·θ] + u over c_prev, S1 = Σ |c|. Else
        (SPD): d = θ − θ₀, S0 = Σ g·d, S1 = Σ d², θ ← d + u, S2 = Σ (d + u)².
        """
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        cols_in_row = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = cols_in_row < cols
        i = row * cols + cols_in_row
        acc = tl.float64 if p_ptr.dtype.element_ty == tl.float64 else tl.float32
        # the hyperparameters, from device memory in the accumulator's dtype (a Python float
        # argument would be float32)
        w1, beta2, w2 = tl.load(hyper_ptr), tl.load(hyper_ptr + 1), tl.load(hyper_ptr + 2)
        value, lrwd, lr = tl.load(hyper_ptr + 3), tl.load(hyper_ptr + 4), tl.load(hyper_ptr + 5)
        momentum, weight_decay = tl.load(hyper_ptr + 6), tl.load(hyper_ptr + 7)
        p = tl.load(p_ptr + i, mask=mask, other=0.0).to(acc)
        g = tl.load(g_ptr + i, mask=mask, other=0.0).to(acc) if HAS_G else tl.zeros([BLOCK], acc)
        u = tl.zeros([BLOCK], acc)
        if ADAM:
            m = tl.load(m_ptr + i, mask=mask, other=0.0).to(acc)
            v = tl.load(v_ptr + i, mask=mask, other=0.0).to(acc)
            if SMALL:  # PyTorch's lerp, in the form its weight 1 − β1 selects
                m = m + w1 * (g - m)
            else:
                m = g - (g - m) * (1 - w1)
            v = v * beta2 + w2 * g * g
            _store(m_ptr + i, m, mask)
            _store(v_ptr + i, v, mask)
            second = v
            if AMSGRAD:
                second = tl.maximum(tl.load(vm_ptr + i, mask=mask, other=0.0).to(acc), v)
                _store(vm_ptr + i, second, mask)
            scale = tl.load(scale_ptr).to(acc)
            offset = tl.load(offset_ptr).to(acc)
            u = value * m / (tl.sqrt(second) * scale + offset)
        if SGD:
            d = g
            if WD:
                d = d + weight_decay * p
            if MOMENTUM:
                coef = tl.load(coef_ptr).to(acc)
                b = momentum * tl.load(b_ptr + i, mask=mask, other=0.0).to(acc) + coef * d
                _store(b_ptr + i, b, mask)
                d = d + momentum * b if NESTEROV else b
            u = -lr * d
        if ANCHOR:
            x = p - tl.load(a_ptr + i, mask=mask, other=0.0).to(acc)
        else:
            x = p
        base = sums_ptr + (row * chunks + chunk) * 3
        if FTP:
            c_prev = tl.load(c_ptr + i, mask=mask, other=0.0).to(acc)
            tl.store(base, tl.sum(c_prev * g, axis=0))
            if WD and ADAM:
                x = x + lrwd * p
            x = x + u
            _store(c_ptr + i, x, mask)
            tl.store(base + 1, tl.sum(tl.abs(x), axis=0))
            tl.store(base + 2, tl.sum(tl.zeros([BLOCK], acc), axis=0))
        else:
            tl.store(base, tl.sum(g * x, axis=0))  # g is 0 without HAS_G
            tl.store(base + 1, tl.sum(x * x, axis=0))
            if ADAM:
                x = x + u
                _store(p_ptr + i, x, mask)
            tl.store(base + 2, tl.sum(x * x, axis=0) if ADAM else tl.sum(tl.zeros([BLOCK], acc), axis=0))

    @triton.jit
    def _project_kernel(
        p_ptr, a_ptr, c_ptr, n_ptr, s_ptr, radius_ptr, cols, ANCHOR: tl.constexpr, BLOCK: tl.constexpr
    ):
        """θ = θ₀ + clip(γ / n_r, 0, 1) · c_r for one block of row r; the row's first block writes s_r = 1 / n_r."""
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        cols_in_row = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = cols_in_row < cols
        i = row * cols + cols_in_row
        n = tl.load(n_ptr + row)
        scale = tl.minimum(tl.maximum(tl.load(radius_ptr).to(n.dtype) / n, 0.0), 1.0)
        acc = tl.float64 if p_ptr.dtype.element_ty == tl.float64 else tl.float32
        x = tl.load(c_ptr + i, mask=mask, other=0.0).to(acc) * scale.to(acc)
        if ANCHOR:
            x = tl.load(a_ptr + i, mask=mask, other=0.0).to(acc) + x
        _store(p_ptr + i, x, mask)
        if chunk == 0:
            tl.store(s_ptr + row, 1 / n)

    @triton.jit
    def _decay_kernel(
        p_ptr, a_ptr, keep_ptr, count, ANCHOR: tl.constexpr, WRAPPER: tl.constexpr, BLOCK: tl.constexpr
    ):
        """AdamSPD (θ holds θ̃ − θ₀): θ ← θ₀ + keep · θ. The wrapper (θ holds θ̃): θ ← θ · keep + θ₀ · (1 − keep)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.float64 if p_ptr.dtype.element_ty == tl.float64 else tl.float32
        keep = tl.load(keep_ptr).to(acc)
        mask = i < count
        if WRAPPER:  # keep = 1 (no decay): θ̃ stays as it is, nothing read or written
            mask = mask & (tl.zeros([BLOCK], dtype=acc) + keep != 1)
        x = tl.load(p_ptr + i, mask=mask, other=0.0).to(acc) * keep
        if ANCHOR:
            a = tl.load(a_ptr + i, mask=mask, other=0.0).to(acc)
            x = x + a * (1 - keep) if WRAPPER else a + x
        _store(p_ptr + i, x, mask)


_HYPER = {}


def _hyper(values, dtype, device):
    """The hyperparameters as a device vector, made once per distinct set (a schedule makes a new one
    per learning rate: one small host-to-device copy, which does not wait for the device)."""
    key = (tuple(float(x) for x in values), dtype, device)
    if key not in _HYPER:
        if len(_HYPER) >= 64:
            _HYPER.clear()
        _HYPER[key] = torch.tensor(key[0], dtype=dtype, device=device)
    return _HYPER[key]


def _sweep(p, g, *, a, c=None, m=None, v=None, vm=None, b=None, scale=None, offset=None, coef=None,
           adam=False, sgd=False, ftp=False, beta1=0.9, beta2=0.999, value=0.0, lrwd=0.0, lr=0.0,
           momentum=0.0, weight_decay=0.0, nesterov=False):  # fmt: skip
    """Launch `_sweep_kernel` over one tensor; returns its sums, ``(rows, 3)`` (FTP) or ``(3,)`` (SPD)."""
    rows, cols = _rows_cols(p, whole=not ftp)
    chunks = triton.cdiv(cols, BLOCK)
    accumulator = _accumulator(p.dtype)
    sums = torch.empty((rows, chunks, 3), dtype=accumulator, device=p.device)
    hyper = _hyper(
        (1 - beta1, beta2, 1 - beta2, value, lrwd, lr, momentum, weight_decay), accumulator, p.device
    )
    dummy = p  # an unused pointer argument (its flag is off)
    _sweep_kernel[(rows, chunks)](
        p, dummy if g is None else g, dummy if m is None else m, dummy if v is None else v,
        dummy if vm is None else vm, dummy if a is None else a, dummy if c is None else c,
        dummy if b is None else b, sums, dummy if scale is None else scale,
        dummy if offset is None else offset, dummy if coef is None else coef, hyper, cols, chunks,
        ADAM=adam, SGD=sgd, FTP=ftp, AMSGRAD=vm is not None, ANCHOR=a is not None,
        WD=(lrwd != 0) if adam else weight_decay != 0, HAS_G=g is not None, SMALL=1 - beta1 < 0.5,
        MOMENTUM=b is not None, NESTEROV=nesterov, BLOCK=BLOCK,
    )  # fmt: skip
    return sums.sum(1) if ftp else sums.sum((0, 1))


def _ftp_results(swept):
    """``(∇γ, MARS(c))`` of the tensors from ``(sums, state)`` pairs: ``∇γ`` stacked, ``MARS(c)`` a list.

    A tensor's ``∇γ`` is ``Σ_r s_r · Σ_j (c_prev ⊙ g)_rj``; its row sums of ``|c|`` are ``MARS(c)``.
    """
    radius_grads, row_sums = [], []
    for sums, state in swept:
        s = state["prev_inv_norm"]
        radius_grads.append((sums[:, 0].to(s.dtype) * s.reshape(-1)).sum())
        row_sums.append(sums[:, 1].to(s.dtype).reshape(s.shape))
    return torch.stack(radius_grads), row_sums


def adam_ftp_sweeps(
    params, grads, moments, anchors, states, scale, offset, value, *, beta1, beta2, amsgrad, lrwd
):
    """AdamFTP's sweep over each tensor: ``(∇γ, MARS(c))`` as `_torch_ops._adam_ftp_kernels_` returns them."""
    return _ftp_results(
        (
            _sweep(
                p, g, a=a, c=state["prev_displacement"], m=m, v=v, vm=vm if amsgrad else None, scale=scale[i],
                offset=offset[i], adam=True, ftp=True, beta1=beta1, beta2=beta2, value=value, lrwd=lrwd,
            ),
            state,
        )
        for i, (p, g, m, v, vm, a, state) in enumerate(zip(params, grads, *moments, anchors, states, strict=True))
    )  # fmt: skip


def sgd_ftp_sweeps(
    params, grads, buffers, anchors, states, coefficients, *, lr, momentum, weight_decay, nesterov
):
    """SGDFTP's sweep over each tensor; ``coefficients``: the momentum coefficient of ``u`` per tensor (device)."""
    return _ftp_results(
        (
            _sweep(
                p, g, a=a, c=state["prev_displacement"], b=b if momentum != 0 else None, coef=coefficients[i],
                sgd=True, ftp=True, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
            ),
            state,
        )
        for i, (p, g, b, a, state) in enumerate(zip(params, grads, buffers, anchors, states, strict=True))
    )  # fmt: skip


def ftp_wrapper_sweeps(params, grads, anchors, states):
    """The FTP wrapper's sweep after the wrapped step: ``∇γ``, ``c = θ̃ − θ₀``, ``MARS(c)``."""
    return _ftp_results(
        (_sweep(p, g, a=a, c=state["prev_displacement"], ftp=True), state)
        for p, g, a, state in zip(params, grads, anchors, states, strict=True)
    )


def adam_spd_sweeps(params, grads, moments, anchors, scale, offset, value, *, beta1, beta2, amsgrad):
    """AdamSPD's sweep over each tensor: ``(⟨g, θ − θ₀⟩, ‖θ − θ₀‖², ‖θ̃ − θ₀‖²)`` per tensor, ``(n, 3)``."""
    return torch.stack([
        _sweep(p, g, a=a, m=m, v=v, vm=vm if amsgrad else None, scale=scale[i], offset=offset[i], adam=True,
               beta1=beta1, beta2=beta2, value=value)
        for i, (p, g, m, v, vm, a) in enumerate(zip(params, grads, *moments, anchors, strict=True))
    ])  # fmt: skip


def spd_measures(params, anchors, grads=None):
    """The SPD wrapper's ``(⟨g, θ − θ₀⟩, ‖θ − θ₀‖²)`` per tensor (the alignment ``None`` without ``grads``)."""
    sums = torch.stack([
        _sweep(p, None if grads is None else grads[i], a=a) for i, (p, a) in enumerate(zip(params, anchors, strict=True))
    ])  # fmt: skip
    return (None if grads is None else sums[:, 0]), sums[:, 1]


def project_(params, anchors, displacements, norm_list, radii, inv_norms):
    """FTP's projection of each tensor, ``radii`` a device vector, ``norm_list`` the norms ``MARS(c) + 1e-8``."""
    for i, (p, a, c, n, s) in enumerate(
        zip(params, anchors, displacements, norm_list, inv_norms, strict=True)
    ):
        rows, cols = _rows_cols(p, whole=False)
        radius = radii[i : i + 1]
        _project_kernel[(rows, triton.cdiv(cols, BLOCK))](
            p, p if a is None else a, c, n, s, radius, cols, ANCHOR=a is not None, BLOCK=BLOCK
        )


def decay_(params, anchors, keep, *, wrapper):
    """SPD's decay of each tensor, ``keep`` a device vector ``1 − λr`` (see `_decay_kernel`)."""
    for i, (p, a) in enumerate(zip(params, anchors, strict=True)):
        count = p.numel()
        _decay_kernel[(triton.cdiv(count, BLOCK),)](
            p,
            p if a is None else a,
            keep[i : i + 1],
            count,
            ANCHOR=a is not None,
            WRAPPER=wrapper,
            BLOCK=BLOCK,
        )
