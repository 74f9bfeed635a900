"""The panel's schedule picture: its cells are what the run installs (the pass sequence of ``generation`` and the
method wrapper, driven step by step), for every method, window, hires mode and weight; and its HTML carries them."""

from __future__ import annotations

import re
from html import escape
from html.parser import HTMLParser
from types import SimpleNamespace
from typing import Any

import pytest
from torch import nn

from lib_multilora import generation
from lib_multilora.args import MultiLoraArgs
from lib_multilora.preview import compose
from lib_multilora.schedule_picture import columns, img2img_steps, render, sampling_passes

PROMPT = "a portrait <lora:charA:0.8> <lora:outfitB:0.8> <lora:styleC:0.8>"
NAMES = ["charA", "outfitB", "styleC"]


class InstallingHost:
    """A :class:`generation.Host` with the prompt's LoRAs loaded whose ``install`` builds the method wrapper as the
    real hosts do (``generation.method_inner`` around an inner model that is never called)."""

    merges_each_mention = True

    def __init__(self) -> None:
        self.loaded = [SimpleNamespace(name=n, mentioned_name=n, network_on_disk=None) for n in NAMES]
        self.wrapper: Any = None

    def loaded_networks(self) -> list[Any]:
        return self.loaded

    def device(self) -> Any:
        import torch

        return torch.device("cpu")

    covered_models = generation.NOTHING_COVERED

    def refusal(self, p: Any, resolved: generation.Resolved) -> None:
        return None

    def plan(self, p: Any, resolved: generation.Resolved) -> generation.Plan:
        return generation.Plan({}, exact_merge=True)

    def mute_text_encoder(self, p: Any, muted: list[Any]) -> None:
        return None

    def unmute_text_encoder(self, p: Any, state: Any) -> None:
        pass

    def install(self, p: Any, resolved: generation.Resolved, engine: Any, keep_merged: bool, offset: int) -> None:
        self.wrapper = generation.method_inner(p, resolved, engine, nn.Identity(), keep_merged, offset, self.device())

    def finish_pass(self, p: Any) -> None:
        self.wrapper = None


class Generation:
    """Enough of a txt2img processing object for the pass sequence, with the sampler's CFG denoiser counters."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.extra_generation_params: dict[str, Any] = {}
        self.sd_model = SimpleNamespace(is_sd1=True)
        self.sampler = SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=0, total_steps=None, steps=None))
        self.comments: list[str] = []

    def comment(self, text: str) -> None:
        self.comments.append(text)


def what_runs(args: MultiLoraArgs, steps: int, hires_steps: int | None) -> list[tuple[str, int, tuple[int, ...]]]:
    """(pass, step, active LoRAs) of every step, as the run's wrapper answers them (none: the pass runs merged)."""
    host, p = InstallingHost(), Generation(steps)
    generation.begin(p, (vars(args),), host)
    out = []
    for name, count in [("first", steps)] + ([("hires", hires_steps or steps)] if hires_steps is not None else []):
        p.is_hr_pass = name == "hires"
        generation.start_pass(p, host)
        denoiser = p.sampler.model_wrap_cfg
        denoiser.steps = denoiser.total_steps = count
        for step in range(count):
            denoiser.step = step
            active = tuple(host.wrapper.active_loras()) if host.wrapper is not None else ()
            out.append((name, step, active))
    return out


CASES = [
    MultiLoraArgs(True, "Switch", 4),
    MultiLoraArgs(True, "Switch", 3, start=0.2, end=0.8),
    MultiLoraArgs(True, "Switch", 2, loras="styleC, charA", start=3, end=9),
    MultiLoraArgs(True, "Switch", 1, start=0.5),
    MultiLoraArgs(True, "Composite"),
    MultiLoraArgs(True, "Composite", weights="2,0,1", start=0.0, end=0.4),
    MultiLoraArgs(True, "Spatial", weights="1,1,3", start=0.25, end=1.0),
    MultiLoraArgs(True, "Switch", 50),
    MultiLoraArgs(True, "Composite", start=0.7, end=0.3),
]


@pytest.mark.parametrize("hires", ["Restart", "Continue", "Off"])
@pytest.mark.parametrize("hires_steps", [None, 0, 5])
@pytest.mark.parametrize("args", CASES, ids=lambda a: f"{a.method}-{a.tau}-{a.loras}-{a.weights}-{a.start}-{a.end}")
def test_the_picture_shows_what_the_run_installs(args: MultiLoraArgs, hires_steps: int | None, hires: str) -> None:
    args = MultiLoraArgs(**{**vars(args), "hires": hires})
    composition = compose(PROMPT, args)
    cols = columns(composition, sampling_passes(12, hires_steps, hires))
    assert [(c.pass_name, c.step, c.active) for c in cols] == what_runs(args, 12, hires_steps)


def test_continue_counts_the_hires_pass_after_the_first_and_spans_the_window_over_both() -> None:
    args = MultiLoraArgs(True, "Switch", 3, start=0.1, end=0.9, hires="Continue")
    cols = columns(compose(PROMPT, args), sampling_passes(12, 8, "Continue"))
    hires = [c for c in cols if c.pass_name == "hires"]
    assert [c.count for c in hires] == list(range(12, 20))
    # the first pass's window is 1-10 of 12; the hires pass's is 2-17 of 20, its schedule counted from step 2
    assert [c.active for c in hires] == [(0,), (0,), (1,), (1,), (1,), (2,), (), ()]


def test_unet_passes_per_step() -> None:
    def passes(args: MultiLoraArgs) -> list[int]:
        return [c.unet_passes for c in columns(compose(PROMPT, args), sampling_passes(4))]

    assert passes(MultiLoraArgs(True, "Switch", 1)) == [1, 1, 1, 1]
    assert passes(MultiLoraArgs(True, "Composite", end=0.5)) == [3, 3, 1, 1], "merged outside the window: one pass"
    assert passes(MultiLoraArgs(True, "Composite", weights="1,0,1")) == [2] * 4, "weight 0: no pass"
    assert passes(MultiLoraArgs(True, "Spatial")) == [4] * 4, "Spatial runs the base too"


def test_img2img_counts_the_steps_after_the_denoising_strength_as_the_webui_does() -> None:
    # modules/sd_samplers_common.setup_img2img_steps and launch_sampling(t_enc + 1): t_enc = int(min(d, 0.999) * steps)
    assert img2img_steps(20, 0.5, False) == 11
    assert img2img_steps(20, 0.75, False) == 16
    assert img2img_steps(20, 1.0, False) == 20
    assert img2img_steps(20, 0.0, False) == 1
    assert img2img_steps(20, 0.3, True) == 20, "the webui's 'exactly the steps of the slider' setting"


class Cells(HTMLParser):
    """The picture's elements with ``data-`` attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str]] = []
        self.root: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        data = {k[5:]: v or "" for k, v in attrs if k.startswith("data-")}
        if tag == "div" and not self.root:
            self.root = data
        elif data:
            self.cells.append(data)

    handle_startendtag = handle_starttag


def parse(html: str) -> Cells:
    cells = Cells()
    cells.feed(html)
    return cells


def test_the_html_carries_every_cell_with_its_state_weight_and_passes() -> None:
    args = MultiLoraArgs(True, "Composite", weights="2,0,1", end=0.5)
    composition = compose(PROMPT, args)
    passes = sampling_passes(6, 2, "Restart")
    html = render(composition, passes)
    cells = parse(html)
    assert cells.root == {"method": "Composite", "loras": "charA,outfitB,styleC"}
    loras = [c for c in cells.cells if "lora" in c]
    assert len(loras) == 3 * 8
    first = {(c["lora"], c["step"]): c for c in loras if c["pass"] == "first"}
    assert first[("charA", "0")] == {
        "lora": "charA",
        "pass": "first",
        "step": "0",
        "state": "run",
        "weight": "0.6667",
    }
    assert first[("outfitB", "0")]["state"] == "skipped"
    assert first[("styleC", "2")]["weight"] == "0.3333"
    assert first[("charA", "3")]["state"] == "merged" and "weight" not in first[("charA", "3")]
    hires = {(c["lora"], c["step"]): c["state"] for c in loras if c["pass"] == "hires"}
    assert hires == {
        (n, s): ("skipped" if n == "outfitB" and s == "0" else "run" if s == "0" else "merged")
        for n in NAMES
        for s in ("0", "1")
    }
    costs = [(c["pass"], c["step"], c["passes"]) for c in cells.cells if "passes" in c]
    assert costs == [("first", str(i), "2" if i < 3 else "1") for i in range(6)] + [
        ("hires", "0", "2"),
        ("hires", "1", "1"),
    ]


def test_switch_cells_and_a_lora_the_schedule_never_reaches() -> None:
    composition = compose(PROMPT, MultiLoraArgs(True, "Switch", 5))
    html = render(composition, sampling_passes(8))
    states = {(c["lora"], int(c["step"])): c["state"] for c in parse(html).cells if "lora" in c}
    assert [states[("charA", i)] for i in range(8)] == ["run"] * 5 + ["wait"] * 3
    assert [states[("outfitB", i)] for i in range(8)] == ["wait"] * 5 + ["run"] * 3
    assert all(states[("styleC", i)] == "wait" for i in range(8))
    assert "no step for styleC (first pass)" in html


def test_where_the_run_would_be_merge_the_picture_says_why() -> None:
    for args, why in [
        (MultiLoraArgs(), "Off: every <lora> is merged"),
        (MultiLoraArgs(True, "Switch", loras="charA, nope"), "nope is not in the prompt"),
        (MultiLoraArgs(True, "Composite", start=0.5, end=0.5), "Empty step window"),
        (MultiLoraArgs(True, "Blend"), "unknown method 'Blend'"),
    ]:
        html = render(compose(PROMPT, args), sampling_passes(10))
        assert parse(html).root == {"fallback": "1"} and escape(why) in html, html
        assert "<rect" not in html
    assert "No &lt;lora&gt; tags" in render(compose("a cat", MultiLoraArgs(True)), sampling_passes(10))


def test_names_are_escaped() -> None:
    prompt = 'a <lora:a&b"<x:1> <lora:plain:1>'
    html = render(compose(prompt, MultiLoraArgs(True, "Composite")), sampling_passes(2))
    assert {c["lora"] for c in parse(html).cells if "lora" in c} == {'a&b"<x', "plain"}
    assert not re.search(r'<lora:a&b"<x', html)
