// Hover hints for the Multi-LoRA Composition panel, through the webui's `titles` mechanism.
(function () {
    const hints = {
        "Multi-LoRA Composition": "Compose the <lora> tags of the prompt with LoRA Switch or LoRA Composite (Zhong et al., 2024) instead of merging them all into the weights.",
        "Switch": "LoRA Switch: one LoRA is active at a time; the active LoRA changes every τ steps, cycling in prompt order. Costs the same as a normal generation.",
        "Composite": "LoRA Composite: every step runs the UNet once per LoRA and averages the predictions before CFG. Costs N UNet passes per step for N LoRAs.",
        "Switch every τ steps": "LoRA Switch: step i uses LoRA (i // τ) mod N. With τ ≥ steps only the first LoRA runs in the UNet.",
        "Composite execution": "Sequential: N UNet calls per step (other extensions see their normal batch). Batched: one call on the batch replicated per LoRA (faster on GPU, N× activation memory). Auto: Batched on CUDA.",
        "Sequential": "Composite runs the UNet once per LoRA, one after the other.",
        "Batched": "Composite runs one UNet call on the batch replicated once per LoRA; falls back to Sequential on out-of-memory.",
        "Text encoder sees": "All: every <lora> shapes the prompt's conditioning (webui default). First: only the first composed LoRA (the paper's Switch). None: no composed LoRA.",
        "Hires pass": "Restart: the schedule starts again in the hires pass. Continue: it keeps counting from the first pass. Off: the hires pass runs merged.",
        "LoRAs to compose": "Comma-separated LoRA names. Empty: every <lora> of the prompt is composed. Otherwise only these are composed; the other <lora> tags stay merged as usual.",
    };
    if (typeof titles === "object") {
        Object.assign(titles, hints);
    }
})();
