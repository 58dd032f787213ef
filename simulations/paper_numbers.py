"""The paper's reported numbers (DP-MemArc / MemDPT, arXiv 2406.11087), read from its text.

Keys: method names of `dpmemarc_core.methods` ("prompt" is PromptDPSGD, which dpmemarc does not implement),
epsilon keys from `common.epsilon_key` ("1.6", "8", "inf"). Figures 2 and 3 are images in the paper; the
text gives no values for them beyond what `FIGURE2_TEXT` and `FIGURE3_TEXT` quote.
"""

from __future__ import annotations

EPSILONS = ("1.6", "8", "inf")

METHOD_LABELS = {
    "full": "DP-Full FT", "lora": "DP-LoRA", "adapter": "DP-Adapters", "bitfit": "DP-BiTFiT",
    "prompt": "PromptDPSGD", "side": "MemDPT_side", "rev": "MemDPT_rev", "zo": "DPZero (extra)",
}


def _by_epsilon(values: tuple[float, float, float]) -> dict[str, float]:
    return dict(zip(EPSILONS, values))


# Table 2: RoBERTa-large; memory in GB, accuracy in %, trainable parameters in % of the model.
TABLE2 = {
    method: {"memory_gb": _by_epsilon(mem), "mnli": _by_epsilon(mnli), "qqp": _by_epsilon(qqp),
             "qnli": _by_epsilon(qnli), "sst2": _by_epsilon(sst2), "trainable_percent": share}
    for method, mem, mnli, qqp, qnli, sst2, share in (
        ("full", (26.12, 26.83, 10.93), (51.45, 84.23, 90.65), (61.37, 84.98, 92.30), (59.55, 84.48, 95.13),
         (75.74, 86.20, 96.18), 100.0),
        ("lora", (12.68, 12.24, 7.12), (82.89, 88.28, 90.83), (83.85, 88.73, 91.95), (87.51, 91.38, 94.76),
         (93.58, 95.20, 96.25), 3.82),
        ("adapter", (13.29, 13.07, 7.38), (80.84, 86.93, 90.15), (84.20, 87.98, 91.37), (86.17, 90.28, 94.36),
         (92.87, 95.33, 95.82), 1.86),
        ("bitfit", (5.12, 5.88, 4.82), (75.36, 83.74, 89.19), (78.92, 85.20, 90.65), (83.43, 87.57, 93.56),
         (89.12, 93.02, 95.38), 0.08),
        ("prompt", (12.58, 12.06, 7.21), (81.33, 87.02, 90.68), (83.58, 88.31, 91.19), (87.15, 90.89, 94.20),
         (93.12, 95.24, 95.97), 0.96),
        ("side", (6.18, 6.23, 5.66), (81.30, 87.16, 90.91), (84.56, 88.92, 91.66), (86.95, 91.56, 94.40),
         (93.60, 95.44, 95.94), 2.10),
        ("rev", (5.48, 5.65, 4.78), (80.29, 86.12, 90.21), (82.57, 88.12, 91.25), (85.89, 90.31, 94.10),
         (91.78, 93.89, 95.32), 3.92),
    )
}

# Table 3: GPT-2-large on E2E; memory in GB, BLEU and ROUGE-L in %, perplexity.
TABLE3 = {
    method: {"memory_gb": _by_epsilon(mem), "bleu": _by_epsilon(bleu), "rouge_l": _by_epsilon(rouge),
             "perplexity": _by_epsilon(ppl), "trainable_percent": share}
    for method, mem, bleu, rouge, ppl, share in (
        ("full", (58.96, 62.23, 20.45), (62.2, 66.8, 69.3), (63.4, 67.8, 72.6), (2.46, 2.23, 1.85), 100.0),
        ("lora", (22.38, 21.75, 13.68), (65.8, 67.3, 69.5), (64.8, 69.1, 72.4), (2.39, 2.48, 2.32), 2.30),
        ("adapter", (23.68, 24.12, 14.55), (65.2, 66.9, 69.8), (65.1, 68.5, 71.9), (2.44, 2.35, 2.28), 1.16),
        ("bitfit", (9.59, 9.71, 8.62), (61.7, 65.2, 68.6), (62.9, 66.4, 71.3), (2.83, 2.58, 2.77), 0.05),
        ("prompt", (22.12, 20.96, 14.18), (64.2, 66.5, 69.1), (65.0, 68.3, 72.0), (2.60, 2.54, 2.39), 0.67),
        ("side", (11.68, 11.44, 10.17), (66.4, 68.2, 68.9), (64.6, 68.5, 72.7), (2.32, 2.38, 2.24), 1.28),
        ("rev", (9.45, 9.88, 8.39), (65.1, 66.1, 69.8), (64.2, 68.1, 71.6), (2.71, 2.65, 2.58), 2.15),
    )
}

# Table 4: memory (GB) of side / rev under three DP engines, δ = 2e-5 (the model is not named; the BK
# rows equal Table 2's RoBERTa-large figures).
TABLE4 = {
    "opacus": {"side": _by_epsilon((7.45, 7.33, 5.60)), "rev": _by_epsilon((10.66, 10.98, 4.82))},
    "ghostclip": {"side": _by_epsilon((9.72, 9.54, 5.72)), "rev": _by_epsilon((8.52, 8.43, 4.75))},
    "bk": {"side": _by_epsilon((6.18, 6.23, 5.66)), "rev": _by_epsilon((5.48, 5.65, 4.78))},
}
TABLE4_ENGINE_LABELS = {"opacus": "Opacus (per-example gradients)", "ghostclip": "GhostClip (two passes)",
                        "bk": "Book-Keeping"}

FIGURE2_TEXT = ("Figure 2 (ε = 8): F = LoRA is best among LoRA, parallel adapters, prefix tuning and DyLoRA, "
                "+0.71 accuracy over the others, with similar training memory; the bars' values are not in the text.")
FIGURE3_TEXT = ("Figure 3 (GPT-2-large, E2E, ε = 8, δ = 1/42061, B = 32, 40K steps): side and rev need more steps "
                "than DP-LoRA to reach a stable BLEU; the curves' values are not in the text.")
