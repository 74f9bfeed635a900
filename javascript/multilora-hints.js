// Hover hints for the Multi-LoRA Composition panel, through the webui's `titles` mechanism.
(function () {
    const hints = {
        "Multi-LoRA Composition": "Compose the <lora> tags of the prompt with LoRA Switch or LoRA Composite (Zhong et al., 2024) instead of merging them all into the weights.",
        "Switch": "LoRA Switch: one LoRA is active at a time; the active LoRA changes every τ steps, cycling in prompt order. Costs the same as a normal generation.",
        "Composite": "LoRA Composite: every step runs the UNet once per LoRA and averages the predictions before CFG. Costs N UNet passes per step for N LoRAs.",
        "Switch every τ steps": "LoRA Switch: step i uses LoRA (i // τ) mod N. With τ ≥ steps only the first LoRA runs in the UNet.",
        "LoRAs to compose": "Comma-separated LoRA names. Empty: every <lora> of the prompt is composed. Otherwise only these are composed; the other <lora> tags stay merged as usual.",
    };
    if (typeof titles === "object") {
        Object.assign(titles, hints);
    }
})();
