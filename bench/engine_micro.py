"""Micro-benchmark of the hook engine on the LoRA-touched layers of an SD1.5-sized UNet, without the webui.

The stack holds the layers a kohya LoRA touches in SD1.5's 16 transformer blocks (proj_in/proj_out 1x1 convs,
attention q/k/v/out, feed-forward), at the widths and token counts of a given image size, run on a cond+uncond batch.
Compared, interleaved and repeated: merged weights (what the webui runs), Switch (the merged layers plus one LoRA's
complement hooks, which take the N-1 others away), Composite sequential (N such passes), Composite batched with
per-group deltas and with stacked deltas. Time is the
CPU time of the one compute thread, best of the repeats: other load on a shared machine barely affects it. Prints a
table and, last, one JSON line of the ratios.

    python bench/engine_micro.py [--n 3] [--rank 16] [--size 128] [--repeats 7]

``--spans``: instead, one Flux single block's fused ``linear1`` (3072 -> 3 x 3072 q/k/v + 12288 MLP) and N
diffusers-format LoRAs on its four slices, the weights holding them all merged: Switch's complement hook as the
engine builds it (``LowRankParts``: one matmul for the stacked downs, each slice's ``up`` added in place into its
columns) against the same LoRAs with their ``up``s zero-padded to the whole output (one ``LowRankDelta``: 4x the
``up`` matmul's work), medians of interleaved rounds, and what the N complements hold. ``--size`` is then the
image (tokens: (size/16)^2 + 512 of text).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib_multilora.engine import HookEngine, LowRankDelta, LowRankParts, complements, low_rank_sum

#: SD1.5 transformer blocks: (channels, latent downscale) for down 0-2 (x2 each), mid, up 1-3 (x3 each).
BLOCKS = [(320, 1)] * 2 + [(640, 2)] * 2 + [(1280, 4)] * 2 + [(1280, 8)] + [(1280, 4)] * 3 + [(640, 2)] * 3
BLOCKS += [(320, 1)] * 3
CONTEXT, CONTEXT_TOKENS = 768, 77


class Block(nn.Module):
    """The LoRA-touched layers of one SD1 transformer block, applied in sequence (no attention maths: the layers'
    own cost and the hooks' are what is measured)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj_in, self.proj_out = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.attn = nn.ModuleList(nn.Linear(c, c) for _ in range(4))  # attn1 q/k/v/out
        self.cross_q, self.cross_out = nn.Linear(c, c), nn.Linear(c, c)
        self.cross_kv = nn.ModuleList(nn.Linear(CONTEXT, c) for _ in range(2))
        self.ff_in, self.ff_out = nn.Linear(c, 8 * c), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(x).flatten(2).transpose(1, 2)
        t = t + sum(layer(t) for layer in self.attn[:3]) / 3
        t = self.attn[3](t)
        kv = sum(layer(context) for layer in self.cross_kv).mean(1, keepdim=True)
        t = self.cross_out(self.cross_q(t) + kv)
        a, gate = self.ff_in(t).chunk(2, dim=-1)
        t = self.ff_out(a * torch.nn.functional.gelu(gate))
        return self.proj_out(t.transpose(1, 2).reshape(b, c, h, w))


class Stack(nn.Module):
    def __init__(self, latent: int) -> None:
        super().__init__()
        self.shapes = [(c, max(1, latent // s)) for c, s in BLOCKS]
        self.blocks = nn.ModuleList(Block(c) for c, _ in self.shapes)

    def inputs(self, rows: int) -> list[torch.Tensor]:
        return [torch.randn(rows, c, hw, hw) for c, hw in self.shapes]

    def forward(self, xs: list[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        return torch.stack([block(x, context).mean() for block, x in zip(self.blocks, xs, strict=True)])


def lora_for(module: nn.Module, rank: int) -> LowRankDelta:
    if isinstance(module, nn.Conv2d):
        c_out, c_in = module.weight.shape[:2]
        return LowRankDelta(torch.randn(rank, c_in, 1, 1) * c_in**-0.5, torch.randn(c_out, rank, 1, 1) * 0.01, 1.0)
    d_out, d_in = module.weight.shape
    return LowRankDelta(torch.randn(rank, d_in) * d_in**-0.5, torch.randn(d_out, rank) * 0.01, 1.0)


def touched(stack: Stack) -> list[nn.Module]:
    return [m for m in stack.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def build_engine(stack: Stack, n: int, rank: int, use_stack: bool, seed: int = 0) -> HookEngine:
    """As the host builds it for plain LoRAs: the weights hold all N merged, LoRA k's hooks subtract the others."""
    torch.manual_seed(seed)
    engine = HookEngine(stack=use_stack)
    for module in touched(stack):
        for k, delta in complements({k: lora_for(module, rank) for k in range(n)}, n).items():
            engine.add(module, k, delta)
    return engine


def best_times(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Run every case once to warm up, then ``repeats`` interleaved rounds; least thread CPU seconds per case."""
    for fn in cases.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.thread_time()
            fn()
            samples[name].append(time.thread_time() - start)
    return {name: min(values) for name, values in samples.items()}


#: Flux's hidden width and a single block's fused linear1 slices (q, k, v, MLP), as Forge's offset entries give them.
FLUX_HIDDEN = 3072
FLUX_SPANS = [(0, 3072), (3072, 6144), (6144, 9216), (9216, 21504)]


def spans(n: int, rank: int, size: int, repeats: int) -> dict[str, float]:
    """The ``--spans`` case (module docstring)."""
    tokens = (size // 16) ** 2 + 512
    layer = nn.Linear(FLUX_HIDDEN, FLUX_SPANS[-1][1])
    x = torch.randn(1, tokens, FLUX_HIDDEN)
    loras = {
        k: low_rank_sum(
            [
                LowRankDelta(
                    torch.randn(rank, FLUX_HIDDEN) * FLUX_HIDDEN**-0.5, torch.randn(b - a, rank) * 0.02, 1.0, (a, b)
                )
                for a, b in FLUX_SPANS
            ]
        )
        for k in range(n)
    }

    def padded(delta: LowRankParts) -> LowRankDelta:
        up = torch.zeros(FLUX_SPANS[-1][1], sum(p.down.shape[0] for p in delta.parts))
        r = 0
        for part in delta.parts:
            up[part.span[0] : part.span[1], r : r + part.down.shape[0]] = part.up * part.scale
            r += part.down.shape[0]
        return LowRankDelta(torch.cat([p.down for p in delta.parts]), up, 1.0)

    every = complements(loras, n)
    complement = every[0]
    engines = {"parts": HookEngine(), "padded": HookEngine()}
    engines["parts"].add(layer, 0, complement)
    engines["padded"].add(layer, 0, padded(complement))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for d in every.values() for p in d.parts
                for t in (p.down, p.up)}  # fmt: skip
    samples: dict[str, list[float]] = {"merged": [], "parts": [], "padded": []}
    names = list(samples)
    with torch.no_grad():
        for r in range(repeats + 1):  # the first round warms the caches up, untimed
            for name in names[r % 3 :] + names[: r % 3]:
                engine = engines.get(name)
                if engine is not None:
                    engine.install()
                start = time.thread_time()
                with engine.active([(0, 0, None)]) if engine else contextlib.nullcontext():
                    layer(x)
                if r:
                    samples[name].append(time.thread_time() - start)
                if engine is not None:
                    engine.remove()
    ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
    held = {  # every LoRA's complement: one shared stack, or a padded pair of factors each
        "parts": sum(storages.values()) / 2**20,
        "padded": sum(t.numel() * 4 for d in every.values() for t in (padded(d).down, padded(d).up)) / 2**20,
    }
    print(f"Flux linear1 {FLUX_HIDDEN}->{FLUX_SPANS[-1][1]}, {tokens} tokens, N={n}, rank {rank}, median of {repeats}")
    for name in names:
        extra = f"  holds {held[name]:.2f} MiB" if name in held else ""
        print(f"  {name:<10} {ms[name]:9.1f} ms  {ms[name] / ms['merged']:.3f}x merged{extra}")
    return {
        "parts_over_merged": ms["parts"] / ms["merged"],
        "padded_over_merged": ms["padded"] / ms["merged"],
        "parts_mib": held["parts"],
        "padded_mib": held["padded"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="LoRAs composed (default 3)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (latent = size/8)")
    parser.add_argument("--rows", type=int, default=2, help="rows per denoiser call (cond+uncond = 2)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--spans", action="store_true", help="Flux's fused linear1 with sliced LoRAs (docstring)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the time measured is this thread's
    torch.manual_seed(0)
    if args.spans:
        ratios = spans(args.n, args.rank, args.size, args.repeats)
        print(json.dumps({"device": "cpu", "n_loras": args.n, "rank": args.rank, "size": args.size, **ratios}))
        return 0

    stack = Stack(args.size // 8).eval()
    xs, context = stack.inputs(args.rows), torch.randn(args.rows, CONTEXT_TOKENS, CONTEXT)
    n = args.n
    xs_n = [x.repeat(n, 1, 1, 1) for x in xs]
    context_n = context.repeat(n, 1, 1)
    per_group = build_engine(stack, n, args.rank, use_stack=False)
    stacked = build_engine(stack, n, args.rank, use_stack=True)
    batched_groups = [(k, k * args.rows, (k + 1) * args.rows) for k in range(n)]

    def plain() -> object:
        return stack(xs, context)

    def hooked(engine: HookEngine, groups: list[tuple[int, int, int | None]], rows_n: bool) -> object:
        with engine.active(groups):
            return stack(xs_n, context_n) if rows_n else stack(xs, context)

    def sequential() -> object:
        return [hooked(per_group, [(k, 0, None)], False) for k in range(n)]

    def run_case(engine: HookEngine, groups: list, rows_n: bool) -> Callable[[], object]:
        def case() -> object:
            engine.install()
            try:
                return hooked(engine, groups, rows_n)
            finally:
                engine.remove()

        return case

    def run_sequential() -> object:
        per_group.install()
        try:
            return sequential()
        finally:
            per_group.remove()

    with torch.no_grad():
        times = best_times(
            {
                "merged (no hooks)": plain,
                "switch (one LoRA's complement hooks)": run_case(per_group, [(0, 0, None)], False),
                f"composite sequential x{n}": run_sequential,
                f"composite batched x{n}, per-group deltas": run_case(per_group, batched_groups, True),
                f"composite batched x{n}, stacked deltas": run_case(stacked, batched_groups, True),
            },
            args.repeats,
        )
    names = list(times)
    merged, one, seq, per, stk = (times[k] for k in names)
    layers = len(touched(stack))
    print(
        f"{layers} hooked layers, rank {args.rank}, {args.size}x{args.size}, rows {args.rows}, N={n}, "
        f"best of {args.repeats}, thread CPU time"
    )
    for name in names:
        print(f"  {name:<44} {times[name] * 1e3:9.2f} ms")
    ratios = {
        "switch_hook_over_merged": one / merged,
        "hook_overhead_per_layer_us": (one - merged) / layers * 1e6,
        "composite_seq_over_n_merged": seq / (n * merged),
        "batched_over_seq": per / seq,
        "stacked_over_seq": stk / seq,
        "stacked_over_batched": stk / per,
    }
    for key, value in ratios.items():
        print(f"  {key:<44} {value:9.3f}")
    print(json.dumps({"device": "cpu", "n_loras": n, "rank": args.rank, "size": args.size, **ratios}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
