"""What autograd saves for backward, found without running the model (lab 09's calculator).

:func:`meta_call` runs a model on ``meta`` copies of its tensors (no memory, no compute) under a
``TorchFunctionMode`` (:class:`Walk`) that applies one rule per function the model calls (linear, conv2d, relu,
gelu, batch_norm, layer_norm, dropout, max_pool2d, softmax, matmul, mul, embedding, cross_entropy,
scaled_dot_product_attention; views, adds and reductions save nothing) and records the storages autograd would
keep. A tensor saved twice is one storage and counts once, exactly as the saved-tensor ledger
(:func:`labkit.sliced.models.saved_bytes`) counts, which the tests hold it to. A function without a rule is
listed in ``Walk.unknown``, and the caller falls back to that ledger run on ``meta``.

The walk also records, per operation, the storages it saves and the parameters it uses, which gives the order
in which backward frees activations and makes gradients (:func:`backward_peak`). Attention is counted for the
kernel that really runs (:func:`sdpa_backend`): a fused kernel as one op that keeps q, k, v, its output and a
log-sum-exp per query; the math kernel op by op (:func:`math_attention`), so that the backward's s x s gradients,
made while the s x s weights are still held, are in the peak (measured on this CPU: within 1% of MemTracker for
``nn.TransformerEncoderLayer`` with dropout at 64 to 512 tokens, where it was 15-20% low). The walk also notes where
each activation is made and last used (functions without a rule included): its gradient waits from the last user's
backward to the maker's, as at a residual connection while the other branch's backward runs (6% of the fused
``TransformerEncoderLayer``'s peak). And it keeps the forward's high-water mark (:attr:`Walk.forward_peak`), the peak
where little is saved (a frozen backbone: 4% of a frozen ResNet-18's). :func:`checkpointed` applies
Chen et al. 2016's segment rule: the inputs of every segment are kept, and one segment at a time is recomputed.

This module is long because the rules are one table (a function's name to what it saves) that one mode applies, and
attention's rules (which kernel runs, how each lays out and saves its tensors, the math kernel's ops) belong to it.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .._validate import validate_int

__all__ = ["Walk", "meta_call", "checkpointed", "backward_peak", "ce_loss", "nbytes", "sdpa_backend", "math_attention"]


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else (kwargs or {}).get(name, default)


_NOTHING = {  # functions that save no tensor for backward (their outputs may be views or copies)
    "view", "reshape", "permute", "transpose", "t", "contiguous", "flatten", "unflatten", "unbind", "chunk", "split",
    "squeeze", "unsqueeze", "expand", "__getitem__", "add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_",
    "__sub__", "neg", "clone", "detach", "sum", "mean", "cat", "stack", "narrow", "select", "float", "to", "type_as",
    "adaptive_avg_pool2d", "identity", "__setitem__", "size", "dim", "__get__", "__set__", "repeat_interleave",
}


# Python functions built from others: the walk goes inside them and applies its rules to what they call
_WALK_INTO = {"multi_head_attention_forward"}


def sdpa_backend(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, device="cpu"):
    """The kernel ``F.scaled_dot_product_attention`` would run on ``device`` for tensors like these (their dtype,
    head size, ``requires_grad``, mask and dropout; :func:`torch._fused_sdp_choice` asked with a small real copy),
    as a :class:`torch.nn.attention.SDPBackend`. It honours ``torch.nn.attention.sdpa_kernel``: on a CPU the fused
    "flash" kernel runs unless dropout is on (then the math one does), on a GPU whichever its checks admit."""
    from torch.nn.attention import SDPBackend

    dev = torch.device(device)
    small = lambda t: torch.zeros((1,) * (t.dim() - 2) + (min(t.shape[-2], 16), t.shape[-1]), dtype=t.dtype,  # noqa: E731
                                  device=dev).requires_grad_(t.requires_grad)
    q1, k1, v1 = small(q), small(k), small(v)
    mask = None
    if isinstance(attn_mask, torch.Tensor):
        mask = torch.zeros((q1.shape[-2], k1.shape[-2]), dtype=attn_mask.dtype, device=dev)
    choice = torch._fused_sdp_choice(q1, k1, v1, mask, float(dropout_p), bool(is_causal))
    return SDPBackend(choice)


def math_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as torch's math kernel computes it (``_scaled_dot_product_attention_math``
    in ATen's ``attention.cpp``), in the ops it calls, for the walk to see one by one: q and k^T each scaled by the
    square root of the scale, their product, the mask added, the softmax, dropout on the weights, the product with
    v. What autograd saves: scaled q and k^T, the s x s softmax output, with dropout the s x s noise (CPU; CUDA a
    bool mask) and the dropped weights, and v."""
    d = query.shape[-1]
    root = math.sqrt(scale if scale is not None else 1 / math.sqrt(d))
    L, S = query.shape[-2], key.shape[-2]
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            attn_mask.logical_not(), float("-inf"))
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    attn = torch.matmul(query * root, key.transpose(-2, -1) * root)
    if attn_mask is not None:
        attn = attn + attn_mask
    attn = torch.softmax(attn, -1)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p, True)
    return torch.matmul(attn, value)


def _fused_layout(out, query, backend, device):
    """``out`` (on meta, laid out as the math kernel lays it: contiguous) viewed in the memory order of the fused
    kernel's output: on a CPU, and for CUDA's flash and cuDNN kernels, the query's order (the CPU's measured here,
    torch 2.14: ``empty_like(query)``); CUDA's memory-efficient kernel (B, L, H, E) whatever the query (read from
    torch's ``attention.cu``, unverified on a GPU here). A view: its root, the bytes, and autograd are unchanged."""
    from torch.nn.attention import SDPBackend

    if out.dim() != 4 or query.dim() != 4:
        return out
    if torch.device(device).type == "cuda" and backend == SDPBackend.EFFICIENT_ATTENTION:
        order = [0, 2, 1, 3]
    else:
        order = sorted(range(4), key=lambda i: query.stride(i), reverse=True)
    strides, step = [0] * 4, 1
    for i in reversed(order):
        strides[i], step = step, step * out.shape[i]
    return out.as_strided(out.shape, strides)


def _inside(mode, func, args, kwargs):
    """Call ``func``, a Python function of ``torch.nn.functional``, with ``mode`` active for the calls it makes.

    Its first act is to ask ``has_torch_function`` and hand itself to the active mode, which would be ``mode``
    again, forever; so that one question is answered "no" (the function then runs its own body) and every later
    one as usual (each function it calls comes to ``mode``)."""
    asked = F.has_torch_function
    first = [True]

    def once(ops):
        if first[0]:
            first[0] = False
            return False
        return asked(ops)

    F.has_torch_function = once
    try:
        with mode:
            return func(*args, **kwargs)
    finally:
        F.has_torch_function = asked


class Walk(TorchFunctionMode):
    """Apply each function, on meta tensors, and record the storages autograd would save (one rule per function).

    ``device``: where the model really runs; attention is counted for the kernel that runs there
    (:func:`sdpa_backend`): the fused kernels keep q, k, v, the output (laid out as the kernel lays it), one fp32
    log-sum-exp per query and the mask (a boolean one as the float mask made from it), and their backward makes the
    gradients of q, k and v at once; the math kernel is walked op by op (:func:`math_attention`): it keeps the s x s
    attention weights (with dropout also their noise and the dropped weights). The CUDA rules (dropout keeps a bool
    mask; a fused kernel's dropout a seed and offset; the memory-efficient kernel's output in (B, L, H, E) order)
    are read from torch's source and unverified on a GPU here."""

    def __init__(self, exclude: set[int], device="cpu"):
        super().__init__()
        self.device = device
        self.exclude = exclude          # ids of parameter and buffer roots
        self.saved: dict[int, int] = {}
        self.ops: list[dict] = []       # per op: keys saved, parameters used, output and input bytes
        self.unknown: list[str] = []
        self.notes: list[str] = []
        self.input: int | None = None   # the key of the model's input, when meta_call set it
        self.total = 0                      # bytes of self.saved
        self.forward_peak = 0               # the most alive at once during the forward (activations only)
        self._made: dict[int, tuple] = {}   # per activation: (where it is made, its bytes)
        self._used: dict[int, float] = {}   # per activation: where it is used last
        self._keep: list[torch.Tensor] = []
        self._new = itertools.count(-1, -1)

    def _save(self, t, keys, params):
        r = _root(t)
        if id(r) in self.exclude:
            params.append(r)
            return
        self._keep.append(r)
        self._put(id(r), r.untyped_storage().nbytes())
        keys.append(id(r))

    def _save_new(self, nbytes, keys):
        k = next(self._new)
        self._put(k, int(nbytes))
        keys.append(k)

    def _put(self, key, n):
        before = self.saved.get(key, 0)
        self.saved[key] = max(before, n)
        self.total += self.saved[key] - before

    def _forward(self, tensors, out):
        """The forward's high-water mark: what is saved so far, plus one function's input and its new output (a
        frozen backbone saves nothing, and its layers' outputs are the peak)."""
        o = out[0] if isinstance(out, (tuple, list)) and out else out
        if not tensors or not isinstance(o, torch.Tensor):
            return
        a, ro = _root(tensors[0]), _root(o)
        held = lambda r: id(r) in self.saved or id(r) in self.exclude  # noqa: E731 -- counted already, or a parameter
        here = (0 if held(a) else a.untyped_storage().nbytes()) + (0 if ro is a or held(ro) else nbytes(o))
        self.forward_peak = max(self.forward_peak, self.total + here)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _WALK_INTO:   # its own calls (linear, scaled_dot_product_attention, ...) come through the rules
            return _inside(self, func, args, kwargs)
        out = func(*args, **kwargs)
        tensors = [a for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)]
        self._forward(tensors, out)
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors) or name in _NOTHING:
            self._flow(tensors, out, len(self.ops) - 0.5)
            return out
        self._flow(tensors, out, len(self.ops))
        keys, params = [], []
        rg = lambda t: isinstance(t, torch.Tensor) and t.requires_grad
        a0 = args[0] if args else None
        grads_in = [a0] if rg(a0) else []   # the gradients its backward makes (of the first input, by default)
        if name in ("linear", "conv2d", "conv1d"):
            w = _arg(args, kwargs, 1, "weight")
            if rg(w):
                if name == "linear" and a0.dim() > 2 and not a0.is_contiguous():
                    self._save_new(nbytes(a0), keys)  # reshaped to 2-D by a copy
                else:
                    self._save(a0, keys, params)
            if rg(a0) or name != "linear":
                self._save(w, keys, params)
            b = _arg(args, kwargs, 2, "bias")
            if rg(b):
                params.append(b)
        elif name in ("relu", "relu_", "softmax", "log_softmax", "sigmoid", "tanh"):
            self._save(out, keys, params)
        elif name in ("gelu", "silu"):
            self._save(a0, keys, params)
        elif name == "batch_norm":
            self._save(a0, keys, params)
            for t in (_arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var"),
                      _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")):
                if isinstance(t, torch.Tensor):
                    self._save(t, keys, params)
            if _arg(args, kwargs, 5, "training", False):
                for _ in range(2):  # save_mean, save_invstd: one fp32 value per channel
                    self._save_new(4 * a0.shape[1], keys)
        elif name == "layer_norm":
            k = len(_arg(args, kwargs, 1, "normalized_shape"))
            self._save(a0, keys, params)
            for t in (_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")):
                if isinstance(t, torch.Tensor):
                    self._save(t, keys, params)
            for _ in range(2):  # mean and rstd, fp32, one per normalised row
                self._save_new(4 * math.prod(a0.shape[:a0.dim() - k]), keys)
        elif name == "dropout":
            p, train = _arg(args, kwargs, 1, "p", 0.5), _arg(args, kwargs, 2, "training", True)
            if train and p > 0:  # CPU keeps the scaled noise in the input's dtype, CUDA a bool mask (native_dropout)
                self._save_new(a0.numel() * (1 if torch.device(self.device).type == "cuda" else a0.element_size()),
                               keys)
        elif name in ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices"):
            self._save(a0, keys, params)
            o = out[0] if isinstance(out, tuple) else out
            self._save_new(8 * o.numel(), keys)  # int64 indices
        elif name in ("matmul", "__matmul__", "bmm", "mm"):
            self._matmul(a0, args[1], keys, params)
        elif name in ("mul", "__mul__", "__rmul__", "div", "__truediv__"):
            other = args[1] if len(args) > 1 else None
            if isinstance(other, torch.Tensor):
                if rg(a0) or name.endswith("div__") or name == "div":
                    self._save(other, keys, params)
                if rg(other):
                    self._save(a0, keys, params)
        elif name == "embedding":
            self._save(a0, keys, params)
            params.append(args[1])
        elif name == "cross_entropy":
            logits, target = a0, args[1]
            self._save_new(nbytes(logits), keys)  # log_softmax's result, also saved by nll_loss
            self._save(target, keys, params)
            self._save_new(logits.element_size(), keys)  # total_weight
        elif name == "scaled_dot_product_attention":
            from torch.nn.attention import SDPBackend

            mask = _arg(args, kwargs, 3, "attn_mask")
            backend = sdpa_backend(*args[:3], mask, _arg(args, kwargs, 4, "dropout_p", 0.0),
                                   _arg(args, kwargs, 5, "is_causal", False), self.device)
            if backend == SDPBackend.MATH:   # the math kernel, one op at a time (its backward makes s x s gradients)
                return self._math_attention(func, args, kwargs)
            # a fused kernel: q, k, v, the output, one fp32 log-sum-exp per query (and the mask, if any); its dropout
            # keeps a random seed and offset, no mask. Its output in the kernel's memory order, not the meta
            # device's (the math kernel's), so that a later transpose and reshape copy only where the real run does
            out = _fused_layout(out, args[0], backend, self.device)
            for t in args[:3]:
                self._save(t, keys, params)
            if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:   # made a float mask first, and kept
                self._save_new(mask.numel() * args[0].element_size(), keys)
            elif isinstance(mask, torch.Tensor):
                self._save(mask, keys, params)
            self._save(out, keys, params)
            self._save_new(4 * math.prod(out.shape[:-1]), keys)
            grads_in = [t for t in args[:3] if rg(t)]   # its backward makes the gradients of q, k and v at once
        else:
            self.unknown.append(name)
        o = out[0] if isinstance(out, tuple) else out
        self.ops.append({"keys": keys, "params": params, "out": nbytes(o) if isinstance(o, torch.Tensor) else 0,
                         "in": sum(nbytes(t) for t in grads_in)})
        return out

    def _flow(self, inputs, out, pos):
        """Where each activation is made and last used (``pos``: an op's index, or halfway before it for a function
        without a rule): its gradient waits from its last user's backward to its maker's (:func:`backward_peak`)."""
        if not torch.is_grad_enabled():
            return
        for t in inputs:
            if t.requires_grad and id(t) in self._made:
                self._used[id(t)] = pos
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.requires_grad and id(_root(t)) not in self.exclude:
                self._keep.append(t)
                self._made[id(t)] = (pos, nbytes(t))

    def _math_attention(self, func, args, kwargs):
        """Walk torch's math attention kernel one op at a time (:func:`math_attention`), so that the backward's order
        is modelled: its gradients of the s x s weights (one while the weights' dropout and the output's product are
        undone, two while the softmax is) are made while the weights are still held. The walk of those ops must save
        exactly what the kernel saves (its ledger, :meth:`_ledger`, asked on a copy of this walk); where it does not
        (another torch), the ledger's figures stand, as one op, and ``notes`` says so."""
        sub, ledger = Walk(self.exclude, self.device), Walk(self.exclude, self.device)
        sub._new = ledger._new = self._new
        keys, params = [], []
        out = ledger._ledger(func, args, kwargs, keys, params)
        ledger.ops.append({"keys": keys, "params": params, "out": nbytes(out), "in": nbytes(args[0])})
        try:
            with sub:
                mine = math_attention(*args, **kwargs)
            before = self.exclude | {id(_root(a)) for a in itertools.chain(args, kwargs.values())
                                     if isinstance(a, torch.Tensor)}
            split = lambda w: ({k: b for k, b in w.saved.items() if k in before},  # noqa: E731
                               sorted(b for k, b in w.saved.items() if k not in before))
            agree = split(sub) == split(ledger) and mine.shape == out.shape   # the same inputs, new ones as big
        except Exception as e:  # noqa: BLE001 -- any failure means: use the ledger
            agree, why = False, f"{type(e).__name__}: {e}"
        else:
            why = "it saves other tensors"
        if not agree:
            self.notes.append(f"math attention walked as one op from its ledger ({why}): its backward's s x s "
                              "gradients are not modelled")
            sub = ledger
        self.forward_peak = max(self.forward_peak, self.total + sub.forward_peak)
        for k, b in sub.saved.items():
            self._put(k, b)
        start = len(self.ops)
        self.ops += sub.ops
        self._flow([a for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)], out, start)
        self._made[id(out)] = (len(self.ops) - 1, nbytes(out))
        self._keep += sub._keep + ledger._keep
        self.unknown += sub.unknown
        return out

    def _ledger(self, func, args, kwargs, keys, params):
        """Call ``func`` again under saved-tensor hooks and record what autograd really saves: tensors the walk
        knows (inputs, parameters) by their root, the others as new storages, each once."""
        packed: dict[int, torch.Tensor] = {}

        def pack(t):
            packed.setdefault(id(_root(t)), _root(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = func(*args, **kwargs)
        inputs = {id(_root(a)) for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)}
        for key, r in packed.items():
            if key in inputs or key in self.exclude or key == id(_root(out)):
                self._save(r, keys, params)
            else:
                self._keep.append(r)
                self._save_new(r.untyped_storage().nbytes(), keys)
        return out

    def _matmul(self, a, b, keys, params):
        """matmul folds to mm/bmm: batch dimensions are expanded and reshaped (a copy where no view exists)."""
        if a.dim() >= 3 or b.dim() >= 3:
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) if a.dim() >= 3 and b.dim() >= 3 else None
            if batch is not None:
                a = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
                b = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
            elif a.dim() >= 3:
                a = a.reshape(-1, a.shape[-1])
        for t, other in ((a, b), (b, a)):
            if other.requires_grad:
                self._save(t, keys, params)


def ce_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension (a sequence's tokens are flattened into the batch)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def meta_call(model: nn.Module, x: torch.Tensor, with_loss: bool = True, ledger: bool = False, dtype=None):
    """Run ``model`` on meta copies of its tensors (plus the loss); the walk's record, or the ledger's bytes.
    ``dtype`` casts the floating-point tensors (pure bf16 training)."""
    cast = lambda t: torch.empty_like(t, device="meta", dtype=dtype if dtype and t.is_floating_point() else t.dtype)
    state = {n: cast(t).requires_grad_(t.requires_grad)
             for n, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                         model.named_buffers(remove_duplicate=False))}
    # tied parameters: one meta tensor per shared original
    by_id: dict[int, torch.Tensor] = {}
    for n, t in itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers()):
        state[n] = by_id.setdefault(id(t), state[n])
    xm = cast(x)
    exclude = {id(t) for t in state.values()}

    def run():
        out = torch.func.functional_call(model, state, (xm,), tie_weights=False)
        if with_loss:
            target = torch.empty(out.shape[:-1], dtype=torch.long, device="meta")
            return ce_loss(out, target), out
        return out, out

    if ledger:
        seen: dict[int, int] = {}

        def pack(t):
            r = _root(t)
            if id(r) not in exclude:
                seen[id(r)] = r.untyped_storage().nbytes()
                keep.append(r)
            return t
        keep: list = []
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, out = run()
        return sum(seen.values()), out
    real = next((t.device for t in itertools.chain(model.parameters(), model.buffers())), torch.device("cpu"))
    walk = Walk(exclude, device="cpu" if real.type == "meta" else real)
    walk.input = id(_root(xm))   # the sample: saved by the first op as often as not, and held by the caller anyway
    with walk:
        _, out = run()
    return walk, out


def checkpointed(model: nn.Sequential, x, segments: int):
    layers = list(model)
    segments = validate_int("checkpoint", segments, minimum=1, maximum=len(layers))
    size = math.ceil(len(layers) / segments)
    inputs, largest, h = 0, 0, torch.empty_like(x, device="meta")
    for i in range(0, len(layers), size):
        seg = nn.Sequential(*layers[i:i + size])
        walk, out = meta_call(seg, h, with_loss=i + size >= len(layers))
        inputs += nbytes(h)
        largest = max(largest, sum(walk.saved.values()))
        h = out.detach()
    return inputs + largest, None


def backward_peak(walk, params, grad_bytes, all_grads, grads_all):
    """max over ops j (in reverse) of: saved storages still needed + gradients made so far + the gradient flowing
    into op j and the one it makes + the gradients waiting (of activations made before op j and used after it: a
    residual connection's while the other branch runs)."""
    first_user: dict[int, int] = {}
    for j, op in enumerate(walk.ops):
        for k in op["keys"]:
            first_user.setdefault(k, j)
    last_use: dict[int, tuple] = {}
    for j, op in enumerate(walk.ops):
        for p in op["params"]:
            if p.requires_grad:
                last_use[id(p)] = (j, p.numel() * grad_bytes)
    spans = [(walk._made[k][0], u, walk._made[k][1]) for k, u in walk._used.items()]
    best = 0
    for j in range(len(walk.ops) - 1, -1, -1):
        live = sum(walk.saved[k] for k, u in first_user.items() if u <= j)
        grads = all_grads if grads_all else sum(b for (u, b) in last_use.values() if u >= j)
        waiting = sum(b for made, used, b in spans if made < j < used)
        best = max(best, live + grads + walk.ops[j]["out"] + walk.ops[j]["in"] + waiting)
    return best
