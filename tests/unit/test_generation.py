"""How a host attaches to a processing object (``generation.adopt``, ``begin``), on a plain Python stand-in:
wrappers that run the host's cleanup, then the method they replace, and a ``copy(p)`` that gets wrappers of its own
instead of cleaning up the original. Shown against the real webui's X/Y/Z cells (copies of one p) in tests/webui."""

from __future__ import annotations

import copy
from types import MappingProxyType, SimpleNamespace

import pytest
import torch

from lib_multilora import generation, nesting


class Processing:
    """Has what the hosts wrap (``close``, txt2img's ``calculate_hr_conds``), recording whom they ran on."""

    def __init__(self, log: list[tuple[str, int]]) -> None:
        self.log = log

    def close(self) -> None:
        self.log.append(("close", id(self)))

    def calculate_hr_conds(self) -> None:
        self.log.append(("hr_conds", id(self)))


def test_wrappers_run_before_the_method_once_per_adopt() -> None:
    ran: list[int] = []
    wrappers = {"close": lambda p: ran.append(id(p)), "calculate_hr_conds": lambda p: ran.append(-id(p))}
    log: list[tuple[str, int]] = []
    p = Processing(log)
    generation.adopt(p, wrappers)
    generation.adopt(p, wrappers)  # a second generation on the same p (Loopback) does not wrap twice
    p.close()
    p.calculate_hr_conds()
    assert log == [("close", id(p)), ("hr_conds", id(p))]
    assert ran == [id(p), -id(p)]


def test_a_copy_of_an_adopted_p_cleans_up_itself_not_the_original() -> None:
    ran: list[int] = []
    wrappers = {"close": lambda p: ran.append(id(p))}
    log: list[tuple[str, int]] = []
    p = Processing(log)
    generation.adopt(p, wrappers)
    p.multilora_pass = object()  # the original's pass state, copied along by copy(p)
    q = copy.copy(p)
    generation.adopt(q, wrappers)
    assert "multilora_pass" not in vars(q) and "multilora_pass" in vars(p)
    q.close()
    assert log == [("close", id(q))] and ran == [id(q)]
    p.close()
    assert log[-1] == ("close", id(p)) and ran[-1] == id(p)


def test_a_wrapper_still_calls_the_method_when_cleanup_raises() -> None:
    def broken(p: object) -> None:
        raise RuntimeError("cleanup failed")

    log: list[tuple[str, int]] = []
    p = Processing(log)
    generation.adopt(p, {"close": broken})
    with pytest.raises(RuntimeError, match="cleanup failed"):
        p.close()
    assert log == [("close", id(p))]


def test_unwrap_restores_the_method_and_ignores_other_wrappers() -> None:
    log: list[tuple[str, int]] = []
    p = Processing(log)
    generation.wrap_method(p, "close", lambda p: None)
    q = copy.copy(p)
    generation.unwrap_method(q, "close")  # q's close is p's wrapper: not q's to undo
    assert "close" in vars(q)
    generation.unwrap_method(p, "close")
    assert "close" not in vars(p)


def lora(name: str) -> SimpleNamespace:
    """A loaded LoRA as the hosts' built-in Lora extensions list it."""
    return SimpleNamespace(name=name, mentioned_name=name, network_on_disk=SimpleNamespace(name=name, alias=name))


class RecordingHost:
    """A :class:`generation.Host` that records what the pass sequence asks of it."""

    merges_each_mention = True
    covered_models = MappingProxyType({"Flux": "Flux"})

    def __init__(self, loaded: list[SimpleNamespace] | None = None, refusal: str | None = None) -> None:
        self.loaded, self.refused = loaded or [], refusal
        self.calls: list[str] = []

    def loaded_networks(self) -> list[SimpleNamespace]:
        return self.loaded

    def device(self) -> torch.device:
        return torch.device("cpu")

    def refusal(self, p: object, resolved: generation.Resolved) -> str | None:
        self.calls.append("refusal")
        return self.refused

    def plan(self, p: object, resolved: generation.Resolved) -> generation.Plan | str:
        self.calls.append("plan")
        return generation.Plan({}, exact_merge=True, warnings=["the host says hi"])

    def mute_text_encoder(self, p: object, muted: list[SimpleNamespace]) -> str:
        self.calls.append("mute " + ",".join(n.name for n in muted))
        return "muted state"

    def unmute_text_encoder(self, p: object, state: str) -> None:
        self.calls.append(f"unmute {state}")

    def install(self, p: object, resolved: generation.Resolved, engine: object, keep_merged: bool, offset: int) -> None:
        self.calls.append(f"install {[n.name for n in resolved.composed]} keep_merged={keep_merged} offset={offset}")

    def finish_pass(self, p: object) -> None:
        self.calls.append("finish")


class Generation(Processing):
    """Enough of a txt2img processing object for ``begin``."""

    def __init__(self, log: list[tuple[str, int]]) -> None:
        super().__init__(log)
        self.extra_generation_params = {"Multi-LoRA method": "Switch", "Steps": 8}
        self.comments: list[str] = []
        self.sd_model = SimpleNamespace(is_sd1=True)

    def comment(self, text: str) -> None:
        self.comments.append(text)

    # the webui's processing classes are dataclasses: a copy compares equal to its original (and none is hashable)
    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    __hash__ = None  # type: ignore[assignment]


def test_begin_wraps_close_drops_stale_infotext_and_reads_the_args() -> None:
    host = RecordingHost([lora("alpha"), lora("beta")])
    p = Generation([])
    generation.begin(p, ({"enabled": True, "method": "Composite", "text_encoder": "First"},), host)
    assert host.calls == ["finish"], "a pass left over on this p is ended first"
    assert p.extra_generation_params == {"Steps": 8, nesting.LINK_TEXT: None}, "an earlier X/Y/Z cell's keys are gone"
    assert (p.multilora_args.enabled, p.multilora_args.method) == (True, "Composite")
    p.calculate_hr_conds()
    assert host.calls[-2:] == ["refusal", "mute beta"], "the hires conds get the text-encoder policy (not refused)"
    p.close()
    assert host.calls[-2:] == ["finish", "unmute muted state"] and p.log[-1] == ("close", id(p))
    p.close()
    assert host.calls[-1] == "finish", "nothing is unmuted twice"


def test_a_pass_ends_the_last_one_gives_the_text_encoder_back_then_plans_and_installs() -> None:
    host = RecordingHost([lora("alpha"), lora("beta"), lora("gamma")])
    p = Generation([])
    generation.begin(p, ({"enabled": True, "method": "Switch", "loras": "gamma, alpha", "text_encoder": "None"},), host)
    generation.apply_text_encoder_policy(p, host)
    assert host.calls[-1] == "mute alpha,gamma"
    p.is_hr_pass = False
    generation.start_pass(p, host)
    assert host.calls[-5:] == [
        "finish",
        "unmute muted state",
        "refusal",
        "plan",
        "install ['alpha', 'gamma'] keep_merged=True offset=0",
    ]
    assert host.calls.count("plan") == 1, "the text-encoder policy builds nothing; a pass plans once"
    assert "the host says hi" in p.extra_generation_params[generation.WARNING_LABEL]
    assert "alpha, gamma touch no UNet layer" in p.extra_generation_params[generation.WARNING_LABEL]


def test_a_refused_pass_installs_nothing_and_says_why() -> None:
    host = RecordingHost([lora("alpha"), lora("beta")], refusal="the UNet is elsewhere")
    p = Generation([])
    generation.begin(p, ({"enabled": True, "method": "Composite", "text_encoder": "None"},), host)
    generation.apply_text_encoder_policy(p, host)
    assert not any(call.startswith("mute") for call in host.calls), "a refused pass keeps the text encoder whole"
    p.is_hr_pass = False
    generation.start_pass(p, host)
    assert not any(call.startswith(("install", "plan")) for call in host.calls), "a refused pass builds nothing"
    assert "the UNet is elsewhere; running without Multi-LoRA" in p.extra_generation_params[generation.WARNING_LABEL]


@pytest.mark.parametrize("merges_each_mention", [True, False])
def test_a_lora_written_twice_is_said_only_where_the_host_merges_it_twice(merges_each_mention: bool) -> None:
    host = RecordingHost([lora("alpha"), lora("alpha"), lora("beta")])
    host.merges_each_mention = merges_each_mention
    p = Generation([])
    generation.begin(p, ({"enabled": True, "method": "Composite"},), host)
    resolved = generation.resolve(p, host)
    assert resolved is not None and [n.name for n in resolved.composed] == ["alpha", "beta"]
    said = "alpha appears 2 times" in p.extra_generation_params.get(generation.WARNING_LABEL, "")
    assert said is merges_each_mention


def test_an_unsupported_architecture_is_refused_by_name() -> None:
    host = RecordingHost([lora("alpha"), lora("beta")])
    p = Generation([])
    p.sd_model = SimpleNamespace(is_sd3=True)
    generation.begin(p, ({"enabled": True, "method": "Composite"},), host)
    p.is_hr_pass = False
    generation.start_pass(p, host)
    assert "plan" not in host.calls
    assert "SD3 models are not supported" in p.extra_generation_params[generation.WARNING_LABEL]


def test_a_model_type_the_host_covers_passes_and_others_are_named_with_what_is_covered() -> None:
    Flux, Chroma = type("Flux", (), {}), type("Chroma", (), {})
    covered = {"Flux": "Flux", "StableDiffusion3": "SD3"}  # class name: the name users know
    assert generation.unsupported_model(Flux(), covered) is None
    assert generation.unsupported_model(type("StableDiffusion3", (), {"is_sd3": True})(), covered) is None
    assert generation.unsupported_model(SimpleNamespace(is_sdxl=True)) is None
    said = generation.unsupported_model(Chroma(), covered)
    assert said == "Chroma models are not supported (SD1, SD2, SDXL, Flux and SD3 are)"
    assert generation.unsupported_model(Flux()) == "Flux models are not supported (SD1, SD2 and SDXL are)"


def test_bad_args_warn_once_in_the_infotext() -> None:
    p = Generation([])
    generation.begin(p, ({"enabled": True, "bogus": 1},), RecordingHost())
    generation.warn(p, p.multilora_warnings[0])
    assert p.multilora_args.enabled is False
    assert p.extra_generation_params[generation.WARNING_LABEL].count("bogus") == 1 and len(p.comments) == 1


def test_loras_are_named_as_the_prompt_writes_them_whatever_another_extension_renamed_them_to() -> None:
    """LoRA Block Weight renames A1111's loaded LoRA ``alpha`` to ``alpha_in_LBW_0.123`` (a random suffix per
    generation): the composed set, its warnings and the ``LoRAs to compose`` field use ``alpha``."""
    p = Generation([])
    generation.begin(p, ({"enabled": True, "method": "Composite", "loras": "alpha"},), RecordingHost())
    disk = SimpleNamespace(name="alpha", alias="alpha")
    renamed = SimpleNamespace(name="alpha_in_LBW_0.123", mentioned_name="alpha", network_on_disk=disk)
    resolved = generation.resolve(p, RecordingHost([renamed]))
    assert resolved is not None and resolved.composed == [renamed]
    assert generation.prompt_name(renamed) == "alpha"
    assert "only one LoRA (alpha)" in p.extra_generation_params[generation.WARNING_LABEL]
