"""The delta engine: "LoRA k on rows [a, b)" added to a layer's output through a forward hook.

The webui merges LoRAs into weights; changing which LoRA is active re-merges every touched layer. Here the weights
stay as they are and each hooked layer adds ``delta_k(x[a:b])`` to its output rows instead, so switching LoRAs
between calls costs nothing. A delta may be one LoRA's, or minus the sum of the others' (:func:`complements`) when the
weights hold them all merged. Works on plain torch modules; the host glue only builds the deltas.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# One row group: LoRA ``k`` applies to rows ``start:stop`` (``None`` = to the end) of every hooked layer's batch.
Group = tuple[int, int, int | None]


def _cast(t: torch.Tensor | None, like: torch.Tensor, cache: dict) -> torch.Tensor | None:
    """``t`` on ``like``'s device and dtype, converted once per (device, dtype) since modules can move (medvram)."""
    if t is None:
        return None
    key = (id(t), like.device, like.dtype)
    out = cache.get(key)
    if out is None:
        out = cache[key] = t.to(device=like.device, dtype=like.dtype)
    return out


def _match_channels(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Inpainting UNets feed 9 channels to a conv whose LoRA was trained on 4: the merged path zero-pads the delta,
    which equals applying the delta to the first channels only."""
    return x[:, :in_channels] if x.dim() == 4 and x.shape[1] > in_channels else x


def _conv2d(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, module: nn.Conv2d, groups: int = 1
) -> torch.Tensor:
    """``F.conv2d`` with the module's stride, padding and dilation, padded the way the module pads: the webui's
    tiling sets ``padding_mode='circular'`` on every conv, and a zero-padded delta would leave the inactive LoRAs on
    at the image borders. Same rule as ``nn.Conv2d._conv_forward``."""
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return F.conv2d(x, w, b, module.stride, 0, module.dilation, groups)
    return F.conv2d(x, w, b, module.stride, module.padding, module.dilation, groups)


#: Output features ``[start, stop)`` of a Linear: where a LoRA on a slice of a fused weight lands.
Span = tuple[int, int]


def _add_linear(out: torch.Tensor, h: torch.Tensor, up: torch.Tensor, span: Span | None) -> None:
    """``out[..., span] += h @ up.T`` in place: straight into the output's columns (one ``addmm_`` that writes no
    copy of the layer's output) when the output is one matrix in memory of ``h``'s dtype, else through a temporary
    (an output of another dtype: autocast)."""
    if out.is_contiguous() and out.dtype == h.dtype == up.dtype:
        target = out.view(-1, out.shape[-1])
        target = target if span is None else target[:, span[0] : span[1]]
        target.addmm_(h.reshape(-1, h.shape[-1]), up.T)
        return
    target = out if span is None else out[..., span[0] : span[1]]
    target += F.linear(h, up)


@dataclass
class LowRankDelta:
    """``up(down(x)) * scale`` for a plain LoRA on a Linear or Conv2d: r*(d_in + d_out) work, not d_in*d_out.

    With ``span`` (Linear only) ``up``'s rows are the output features ``[start, stop)`` of the layer: a LoRA on a
    slice of a fused weight (Flux's ``qkv`` and ``linear1``, which diffusers-format LoRAs train as separate
    ``to_q``/``to_k``/``to_v``), kept at the size of its factors. With ``ranks``, the delta is only those rank
    columns of ``down``/``up``: a view of a stack that other deltas share, cast copies included (``_cache``), as
    :func:`complements` builds them."""

    down: torch.Tensor  # [r, d_in] or [r, c_in, kh, kw]
    up: torch.Tensor  # [d_out, r] or [c_out, r, 1, 1]; with a span [stop - start, r]
    scale: float
    span: Span | None = None
    ranks: tuple[tuple[int, int], ...] | None = None
    _cache: dict = field(default_factory=dict, repr=False)
    _pairs: dict = field(default_factory=dict, repr=False)

    def _factors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``down`` and ``up * scale`` on ``like``'s device and dtype, made once per (device, dtype): folding the
        scale in saves a pass over the output on every call; no copy where nothing changes."""
        key = (like.device, like.dtype)
        out = self._cache.get(key)
        if out is None:
            up = self.up if self.scale == 1.0 else self.up.to(device=like.device, dtype=torch.float32) * self.scale
            cast = (self.down.to(device=like.device, dtype=like.dtype), up.to(device=like.device, dtype=like.dtype))
            out = self._cache[key] = cast
        return out

    def _ranges(self) -> tuple[tuple[int, int], ...]:
        return self.ranks or ((0, self.down.shape[0]),)

    def _views(self, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(down, up * scale)`` per rank range, views of :meth:`_factors`, made once per (device, dtype): a hook
        call then slices nothing. A conv's ``up`` columns are copied (its weight must be contiguous, or every call
        copies it; a 1x1 conv's ``up`` is small), a Linear's stay views (``addmm_`` reads them strided)."""
        key = (like.device, like.dtype)
        out = self._pairs.get(key)
        if out is None:
            down, up = self._factors(like)
            out = [(down[a:b], up[:, a:b]) for a, b in self._ranges()]
            out = self._pairs[key] = [(d, u.contiguous() if u.dim() == 4 else u) for d, u in out]
        return out

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This delta's own ``down`` and ``up * scale`` (its ranks' columns: a copy for a view of a stack)."""
        down, up = self.down, self.up.float() * self.scale
        if self.ranks is None:
            return down, up
        return torch.cat([down[a:b] for a, b in self.ranks]), torch.cat([up[:, a:b] for a, b in self.ranks], dim=1)

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        views = self._views(x)
        if views[0][0].dim() == 4:
            x = _match_channels(x, views[0][0].shape[1])
            convs = [F.conv2d(_conv2d(x, down, None, module), up) for down, up in views]
            return functools.reduce(torch.add, convs)
        out = x.new_zeros(*x.shape[:-1], module.weight.shape[0])
        self.add_(module, x, out)
        return out

    @classmethod
    def concat(cls, deltas: Sequence[LowRankDelta], scale: float = 1.0) -> LowRankDelta:
        """``scale * sum(deltas)`` on one layer and one span as one delta: the factors stacked along the rank, each
        delta's scale folded into its ``up``, so any number of LoRAs costs the two matmuls of one. One delta is not
        copied. Deltas on different spans: :func:`low_rank_sum`."""
        span = deltas[0].span
        if any(d.span != span or d.ranks is not None for d in deltas):
            raise ValueError("LowRankDelta.concat joins whole deltas of one span; low_rank_sum joins any")
        if len(deltas) == 1:
            return cls(deltas[0].down, deltas[0].up, deltas[0].scale * scale, span)
        dtype = functools.reduce(torch.promote_types, (d.down.dtype for d in deltas))
        device = deltas[0].down.device
        down = torch.cat([d.down.to(device=device, dtype=dtype) for d in deltas])
        up = torch.cat([(d.up.to(device=device, dtype=torch.float32) * d.scale).to(dtype) for d in deltas], dim=1)
        return cls(down, up, scale, span)

    def add_(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out += self(module, x)`` in place (``out`` is the layer's output for ``x``, or rows of it)."""
        for down, up in self._views(x):
            if down.dim() == 4:
                out += F.conv2d(_conv2d(_match_channels(x, down.shape[1]), down, None, module), up)
            else:
                _add_linear(out, F.linear(x, down), up, self.span)


@dataclass
class LowRankParts:
    """A sum of plain low-rank deltas on one Linear that land on different spans of its output features: a
    diffusers-format LoRA on Flux's fused ``linear1`` (its ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``), or such
    slices beside a LoRA on the whole layer (a complement). Each part adds its ``up`` into its own columns of the
    output in place: the memory and work of the factors. Zero-padding each ``up`` to the whole output instead would
    hold d_out x rank per part and do that much work (on Flux's linear1: 3x the memory, 4x the ``up`` matmul; one CPU
    run of bench/engine_micro.py --spans gave Switch's hook 4.1% of the layer that way, 0.5% this way)."""

    parts: tuple[LowRankDelta, ...]

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], module.weight.shape[0])
        self.add_(module, x, out)
        return out

    def add_(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        for part in self.parts:
            part.add_(module, x, out)


#: A plain LoRA's delta on one layer, whole or in slices.
LowRank = LowRankDelta | LowRankParts


def parts(delta: LowRank) -> tuple[LowRankDelta, ...]:
    return delta.parts if isinstance(delta, LowRankParts) else (delta,)


def low_rank_sum(deltas: Sequence[LowRank], scale: float = 1.0) -> LowRank:
    """``scale * sum(deltas)`` as one delta: per span, the deltas' factors stacked along the rank
    (:meth:`LowRankDelta.concat`); a :class:`LowRankParts` where they land on different spans."""
    by_span: dict[Span | None, list[LowRankDelta]] = {}
    for delta in deltas:
        for part in parts(delta):
            by_span.setdefault(part.span, []).append(part)
    summed = tuple(LowRankDelta.concat(group, scale) for group in by_span.values())
    return summed[0] if len(summed) == 1 else LowRankParts(summed)


@dataclass
class DenseDelta:
    """A dense weight delta (LyCORIS types, DoRA, CP-LoCon) applied with the module's own op.

    ``compute(module)`` returns ``(d_weight, d_bias)``; it runs on first use so that weight-dependent deltas (DoRA)
    see the weights the layer actually runs with in this pass, then the result is cached.
    """

    compute: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]
    _delta: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def add_(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        out += self(module, x)

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._delta is None:
            with torch.no_grad():
                self._delta = self.compute(module)
        w, b = (_cast(t, x, self._cache) for t in self._delta)
        if isinstance(module, nn.Conv2d):
            if w.shape != module.weight.shape and w.shape[1] == module.weight.shape[1]:
                w = torch.broadcast_to(w, module.weight.shape)  # a 1x1 delta on a kxk conv: the merge broadcasts it
            x = _match_channels(x, w.shape[1] * module.groups)
            return _conv2d(x, w, b, module, module.groups)
        if isinstance(module, nn.GroupNorm):
            return _norm_delta(F.group_norm(x, module.num_groups, None, None, module.eps), w, b, x.dim() - 2)
        if isinstance(module, nn.LayerNorm):
            return _norm_delta(F.layer_norm(x, module.normalized_shape, None, None, module.eps), w, b, 0)
        if is_linear(module):
            return F.linear(x, w.reshape(module.weight.shape), b)
        raise TypeError(f"no delta op for {type(module).__name__}")


def is_linear(module: nn.Module) -> bool:
    """A layer that computes ``F.linear(x, weight, bias)``: ``nn.Linear``, or a layer of its own class with a 2-D
    weight that is no norm (Forge's ``Linear`` is a plain ``nn.Module``)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    norm = isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.Conv2d))
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and not norm


def _norm_delta(normed: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, spatial: int) -> torch.Tensor:
    """``norm(x)*(w+dw) + (b+db) - (norm(x)*w + b) = norm(x)*dw + db``, broadcast over the channel dim."""
    shape = (-1,) + (1,) * spatial
    out = torch.zeros_like(normed)
    if w is not None:
        out = out + normed * w.reshape(shape)
    if b is not None:
        out = out + b.reshape(shape)
    return out


#: ``delta(module, x)``: the change to the layer's output for input ``x``; ``delta.add_(module, x, output)`` adds it
#: to the output in place (the layer made it for this call: writing into it saves a copy of it per hooked layer).
Delta = LowRankDelta | LowRankParts | DenseDelta


def complements(deltas: Mapping[int, LowRank], n: int, base: bool = False) -> dict[int, LowRank]:
    """For a layer whose weights hold every one of these LoRAs merged: per LoRA ``k < n``, minus the sum of the
    *other* LoRAs' deltas, so that the merged layer plus complement ``k`` runs LoRA ``k`` alone; with ``base``, index
    ``n`` too: minus all of them (Spatial Composite's base). No entry where no other LoRA touches the layer.

    Per span, one stack of every LoRA's factors there, negated, scales folded in: complement ``k`` is the stack's rank
    columns of the others (one or two ranges: a pair of thin matmuls each), so the pass holds one copy of the LoRAs'
    factors whatever N, not one per complement."""
    by_span: dict[Span | None, list[tuple[int, LowRankDelta]]] = {}
    for j, delta in sorted(deltas.items()):
        for part in parts(delta):
            by_span.setdefault(part.span, []).append((j, part))
    stacks = []
    for span, members in by_span.items():
        stack = LowRankDelta.concat([LowRankDelta(p.down, p.up, -p.scale, span) for _, p in members])
        ranks, start = [], 0
        for j, part in members:
            ranks.append((j, start, start + part.down.shape[0]))
            start += part.down.shape[0]
        stacks.append((stack, ranks))
    out: dict[int, LowRank] = {}
    for k in range(n + 1 if base else n):
        views = []
        for stack, ranks in stacks:
            kept: list[tuple[int, int]] = []
            for j, start, stop in ranks:
                if j == k:
                    continue
                if kept and kept[-1][1] == start:
                    kept[-1] = (kept[-1][0], stop)
                else:
                    kept.append((start, stop))
            if kept:
                whole = kept == [(0, stack.down.shape[0])]
                ranks_k = None if whole else tuple(kept)
                views.append(LowRankDelta(stack.down, stack.up, stack.scale, stack.span, ranks_k, stack._cache))
        if views:
            out[k] = views[0] if len(views) == 1 else LowRankParts(tuple(views))
    return out


def build_engine(
    deltas: dict[nn.Module, dict[int, Delta]], n: int, keep_merged: bool, stack: bool, base: bool = False
) -> HookEngine:
    """The pass's hooks: with ``keep_merged`` (every delta plain low-rank) the composed LoRAs stay merged in the
    weights, as the webui keeps them between generations, and LoRA k's hook subtracts the others
    (:func:`complements`), so the pass touches no weight and costs the hooks only. Otherwise (LyCORIS types, DoRA:
    deltas computed from the weight, which need not add up) the composed LoRAs are taken out of the weights for the
    pass and LoRA k's hook adds its own delta. ``stack`` (batched Composite as batched matmuls) only pays on a GPU,
    where it saves kernel launches; on a CPU the per-group loop is faster (bench/engine_micro.py: 1.2x). ``base``
    adds LoRA index ``n``, no composed LoRA at all (Spatial Composite's base): minus every composed LoRA where they
    stay merged, nothing where they were taken out."""
    engine = HookEngine(stack=stack)
    for module, per_layer in deltas.items():
        for k, delta in (complements(per_layer, n, base) if keep_merged else per_layer).items():
            engine.add(module, k, delta)
    return engine


class StackedLowRank:
    """Every row group's plain LoRA on one Linear as two batched matmuls (batched Composite) instead of 2N small ones.

    Slot ``g`` holds group ``g``'s LoRA (zeros where it has none on this layer), ranks zero-padded to the largest and
    the scale folded into ``up``, so ``baddbmm`` adds all N deltas to the output in one go.
    """

    def __init__(self, deltas: Sequence[LowRankDelta | None]) -> None:
        present = [d for d in deltas if d is not None]
        rank = max(sum(b - a for a, b in d._ranges()) for d in present)
        d_in, d_out = present[0].down.shape[1], present[0].up.shape[0]
        like = present[0].down
        self.down = torch.zeros(len(deltas), d_in, rank, device=like.device, dtype=torch.float32)
        self.up = torch.zeros(len(deltas), rank, d_out, device=like.device, dtype=torch.float32)
        for g, d in enumerate(deltas):
            if d is not None:
                down, up = d.factors()
                self.down[g, :, : down.shape[0]] = down.float().T
                self.up[g, : down.shape[0]] = up.T
        self._cache: dict = {}

    @classmethod
    def build(cls, module: nn.Module, deltas: Sequence[Delta | None]) -> StackedLowRank | None:
        """A stack when it pays: a Linear with at least two groups' deltas, all plain low-rank on the whole layer;
        else None. Deltas on spans run per group: stacked, their ``up``s would be zero-padded to the whole output."""
        present = [d for d in deltas if d is not None]
        plain = all(isinstance(d, LowRankDelta) and d.down.dim() == 2 and d.span is None for d in present)
        return cls(deltas) if is_linear(module) and plain and len(present) > 1 else None

    def __call__(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output`` plus group g's delta on rows ``[g*R, (g+1)*R)``, for batches that are G equal groups."""
        down, up = _cast(self.down, x, self._cache), _cast(self.up, x, self._cache)
        groups = down.shape[0]
        h = torch.bmm(x.reshape(groups, -1, down.shape[1]), down)
        return torch.baddbmm(output.reshape(groups, -1, up.shape[2]), h, up).view(output.shape)


class HookEngine:
    """Owns the forward hooks of one sampling pass and which row groups each LoRA applies to right now.

    ``add`` collects deltas, ``install`` hooks only the layers some delta touches, ``active(groups)`` selects
    LoRAs for the calls made inside it, ``remove`` takes every hook away (idempotent). With ``stack`` (the default),
    groups that split the batch into equal consecutive blocks use :class:`StackedLowRank` where it applies.

    Row groups name rows of the batch the model was called with. A layer that sees another number of rows (Hypertile
    splits each image into tiles inside self-attention) cannot be mapped onto them: its hook adds nothing and sets
    ``misrouted``, and the caller must discard that call's output.
    """

    def __init__(self, stack: bool = True) -> None:
        self.deltas: dict[nn.Module, dict[int, Delta]] = {}
        self.groups: tuple[Group, ...] = ()
        self.stack = stack
        self._rows: int | None = None
        self._total_rows: int | None = None
        self.misrouted = False
        self._stacks: dict[tuple[nn.Module, tuple[int, ...]], StackedLowRank | None] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, module: nn.Module, k: int, delta: Delta) -> None:
        per_module = self.deltas.setdefault(module, {})
        if k in per_module:
            raise ValueError(f"LoRA {k} already has a delta on {type(module).__name__}")
        per_module[k] = delta

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        if self._handles:
            return
        self._handles = [m.register_forward_hook(self._hook) for m in self.deltas]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stacks.clear()
        self.groups, self._rows, self._total_rows = (), None, None

    @contextmanager
    def active(self, groups: Sequence[Group]) -> Iterator[None]:
        """Apply LoRA k to rows [start, stop) of every hooked layer for the calls made inside this block."""
        previous = self.groups, self._rows, self._total_rows
        self.groups = tuple(groups)
        self._rows = _equal_block_rows(self.groups) if self.stack else None
        stops = [stop for _, _, stop in self.groups]
        self._total_rows = None if None in stops else max(stops, default=None)
        self.misrouted = False
        try:
            yield
        finally:
            self.groups, self._rows, self._total_rows = previous

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        groups = self.groups
        if not groups:
            return None
        deltas = self.deltas[module]
        x = args[0]
        if len(groups) == 1 and groups[0][1] == 0 and groups[0][2] is None:
            delta = deltas.get(groups[0][0])
            if delta is not None:
                delta.add_(module, x, output)
            return output
        if self._total_rows is not None and not x.shape[0] == output.shape[0] == self._total_rows:
            self.misrouted = True
            return None
        if self._rows is not None:
            stacked = self._stacked(module, deltas, groups)
            if stacked is not None:
                return stacked(x, output)
        for k, start, stop in groups:
            delta = deltas.get(k)
            if delta is not None:
                delta.add_(module, x[start:stop], output[start:stop])
        return output

    def _stacked(self, module: nn.Module, deltas: dict[int, Delta], groups: tuple[Group, ...]) -> StackedLowRank | None:
        """The stack for this layer and LoRA order, built on first use in the pass."""
        key = (module, tuple(k for k, _, _ in groups))
        if key not in self._stacks:
            self._stacks[key] = StackedLowRank.build(module, [deltas.get(k) for k, _, _ in groups])
        return self._stacks[key]


def _equal_block_rows(groups: tuple[Group, ...]) -> int | None:
    """R when the groups are ``[(k0, 0, R), (k1, R, 2R), ...]`` (a batch replicated once per LoRA), else None."""
    if len(groups) < 2 or groups[0][2] is None:
        return None
    rows = groups[0][2]
    blocks = all(start == g * rows and stop == (g + 1) * rows for g, (_, start, stop) in enumerate(groups))
    return rows if rows > 0 and blocks else None
