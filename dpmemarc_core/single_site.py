"""`train(TrainConfig)`: the single-site run behind `dpmemarc train`."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from dpmemarc_core.privacy import PrivacyAccountant, PrivacySettings, noise_multiplier_for
from dpmemarc_core.training.build import build_run, make_trainer
from dpmemarc_core.training.config import (
    TrainConfig,
    check_physical_batch_size,
    planned_steps,
    sample_rate_for,
)
from dpmemarc_core.training.precision import autocast_context
from dpmemarc_core.training.probe_first import probe_steps_of, run_probe_then_tune


def evaluate(model: torch.nn.Module, task, tokenizer, batch_size: int) -> dict:
    from dpmemarc_core.metrics import evaluate_classification, evaluate_generation

    if task.kind == "classification":
        return evaluate_classification(model, task, batch_size=batch_size)
    return evaluate_generation(model, tokenizer, task)


def choose_physical_batch_size(cfg: TrainConfig, config, kind: str, device: torch.device) -> int:
    """`physical_batch_size = "auto"`: the largest micro-batch whose simulated step (this run's model config,
    method, precision, expected batch and max length) fits the budget (`memory.plan.memory_budget`)."""
    from dpmemarc_core.data import num_labels_of
    from dpmemarc_core.memory.plan import (
        auto_physical_batch_size,
        config_file,
        format_bytes,
        memory_budget,
    )
    from dpmemarc_core.memory.step import MemorySpec

    budget = memory_budget(cfg.memory, device)
    spec = MemorySpec(model=config_file(config), method=cfg.method, batch_size=cfg.batch_size, seq_len=cfg.max_length,
                      precision=cfg.precision, device="meta", epsilon=cfg.epsilon, clipping_mode=cfg.clipping_mode,
                      method_options=dict(cfg.method_options),
                      zo_params=cfg.zo_params if cfg.method == "zo" else "full", task_kind=kind,
                      num_labels=max(num_labels_of(cfg.task), 2))
    option = auto_physical_batch_size(spec, budget)
    source = "--memory" if cfg.memory else "free CUDA memory" if device.type == "cuda" else "available RAM"
    print(f"dpmemarc: physical batch size auto: {option.physical_batch_size} ({option.steps_per_batch} "
          f"micro-batch(es) per expected batch of {cfg.batch_size}); simulated peak {format_bytes(option.peak_bytes)} "
          f"in a budget of {format_bytes(budget)} ({source}); the expected batch, the noise and the accounting are "
          "unchanged", flush=True)
    return option.physical_batch_size


def checked_probe_steps(cfg: TrainConfig, kind: str, steps: int) -> int:
    """The steps of `cfg.probe_fraction` (head alone first): a BK method's classifier only."""
    probe_steps = probe_steps_of(cfg.probe_fraction, steps)
    if probe_steps and (kind != "classification" or cfg.method == "zo"):
        raise ValueError(f"probe_fraction > 0 trains a classifier head first: it needs a classification task and "
                         f"a BK method, got task {cfg.task!r} ({kind}) and method {cfg.method!r}")
    return probe_steps


def train(cfg: TrainConfig) -> dict:
    """One private fine-tuning run: evaluate, train, evaluate, write summary.json, the trainable state and the
    export folder ``final/`` (see `dpmemarc_core.methods.save_pretrained`)."""
    from dpmemarc_core.data import load_task, num_labels_of, task_kind_of
    from dpmemarc_core.methods import save_pretrained, trainable_state_dict
    from dpmemarc_core.training.export import FINAL_DIR, single_site_privacy

    privacy = PrivacySettings(target_epsilon=cfg.epsilon, delta=cfg.delta, max_grad_norm=cfg.max_grad_norm,
                              clipping_mode=cfg.clipping_mode, clip_fn=cfg.clip_fn, accountant=cfg.accountant,
                              secure_mode=cfg.secure_mode, clip_groups=cfg.clip_groups)
    check_physical_batch_size(cfg.physical_batch_size)
    kind = task_kind_of(cfg.task)
    run = build_run(cfg.model, kind, cfg.method, num_labels=num_labels_of(cfg.task),
                    method_options=cfg.method_options, zo_params=cfg.zo_params, precision=cfg.precision,
                    device=cfg.device, seed=cfg.seed)
    model, tokenizer, device, spec = run.model, run.tokenizer, run.device, run.spec
    # summary.json records the precision and micro-batch that ran, not "default" or "auto".
    cfg = replace(cfg, precision=run.precision)
    task = load_task(cfg.task, tokenizer, max_length=cfg.max_length, max_train=cfg.max_train,
                     max_eval=cfg.max_eval, seed=cfg.seed, validation=cfg.validation)
    if cfg.physical_batch_size == "auto":
        cfg = replace(cfg, physical_batch_size=choose_physical_batch_size(cfg, model.config, kind, device))
    n = len(task.train)
    delta = privacy.resolved_delta(n)
    q = sample_rate_for(cfg.batch_size, n)
    steps = planned_steps(cfg, n)
    probe_steps = checked_probe_steps(cfg, kind, steps)
    sigma = noise_multiplier_for(target_epsilon=privacy.target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                 accountant=privacy.accountant)
    print(f"dpmemarc: {cfg.method} on {cfg.model} / {cfg.task}: {n} training examples, {steps} steps at expected "
          f"batch {cfg.batch_size} (q={q:.4g}), epsilon={privacy.target_epsilon} delta={delta:.3g} -> noise "
          f"multiplier {sigma:.4g}; precision {cfg.precision}"
          + (f"; the first {probe_steps} steps train the classifier head alone" if probe_steps else ""), flush=True)
    eval_batch = cfg.physical_batch_size or max(cfg.batch_size, 32)
    with autocast_context(cfg.precision, device.type):
        before = evaluate(model, task, tokenizer, eval_batch)
    print(f"before training: {json.dumps(before)}", flush=True)
    accountant = PrivacyAccountant(privacy.accountant)

    def trainer_for(head_alone: bool):
        # the head alone is one clipping group, whatever the run's clip_groups
        settings = replace(privacy, clip_groups="all") if head_alone else privacy
        return make_trainer(cfg.method, model, task.train, task.collate, settings, q, sigma, lr=cfg.lr,
                            head_lr=cfg.head_lr, physical_batch_size=cfg.physical_batch_size, device=device,
                            sampling_seed=cfg.sampling_seed, noise_seed=cfg.noise_seed, precision=cfg.precision,
                            accountant=accountant)

    start = time.perf_counter()
    trainer, train_stats = run_probe_then_tune(trainer_for, model, steps, probe_steps, progress=cfg.progress)
    seconds = time.perf_counter() - start
    with autocast_context(cfg.precision, device.type):
        after = evaluate(model, task, tokenizer, eval_batch)
    print(f"after training:  {json.dumps(after)}", flush=True)
    spent = trainer.accountant.get_epsilon(delta) if privacy.is_private else math.inf
    summary = {
        "model": cfg.model, "task": cfg.task, "method": cfg.method,
        "epsilon": spent, "target_epsilon": privacy.target_epsilon, "delta": delta,
        "noise_multiplier": sigma, "sample_rate": q, "steps": steps, "probe_steps": probe_steps, "train_examples": n,
        "eval_examples": len(task.eval),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "metrics_before": before, "metrics": after,
        # Statistics of the private training examples, released without noise: they stay with the data owner
        # and are outside the (epsilon, delta) above. Nothing else in this file is computed from those examples.
        "non_private_diagnostics": {**train_stats, "train_seconds": seconds},
        "config": asdict(cfg),
        "export": spec.to_dict(),
    }
    if cfg.output:
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in trainable_state_dict(model).items()},
                  str(out / "trainable.safetensors"))
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        save_pretrained(model, spec, out / FINAL_DIR, single_site_privacy(summary), tokenizer)
        print(f"wrote {out / 'summary.json'}, {out / 'trainable.safetensors'} and {out / FINAL_DIR}/", flush=True)
    return summary
