"""What data each process of a federated run reads, and nothing more.

- A real site: its own file, named by its node config's ``data-path`` (`site_data`); N is that file's size.
- A simulated site (no ``data-path``): its ``partition-id`` share of a public data set (the run's ``task``).
- The server: never any training data. Central evaluation runs on a file the server operator owns
  (``eval-path``), else on a public data set's test split when the run's ``task`` names one; else none.

With ``federated-eval`` a site holds a seeded ``site-eval-fraction`` of its rows out of training, to evaluate
the global model on (`federated_eval`).
"""

from __future__ import annotations

from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from dpmemarc_core.data import Task, load_task, partition
from dpmemarc_core.federated.config import SITE_DATA_TASKS, FederatedConfig
from dpmemarc_core.site_data import hold_out, load_site_task


def file_task(cfg: FederatedConfig, tokenizer: PreTrainedTokenizerBase, path: str, holdout: bool = True) -> Task:
    """The rows of a file (a site's ``data-path`` or the server's ``eval-path``), checked and tokenized with the
    run's kind, labels and columns. Every problem is a `SiteDataError` naming file, row and field."""
    fraction = cfg.site_eval_fraction if holdout and cfg.federated_eval else 0.0
    return load_site_task(path, tokenizer, cfg.task_kind(), cfg.num_labels(), cfg.label_names(), cfg.site_columns(),
                          max_length=cfg.max_length, holdout_fraction=fraction, seed=cfg.seed)


def pooled_task(cfg: FederatedConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The public data set that simulated sites split among themselves."""
    if cfg.task in SITE_DATA_TASKS:
        raise ValueError(f"task {cfg.task!r} has no public data set to share out: start the SuperNode with its own "
                         "file, --node-config 'data-path=\"/path/to/data.jsonl\"'")
    return load_task(cfg.task, tokenizer, max_length=cfg.max_length, max_train=cfg.max_train or None,
                     max_eval=cfg.max_eval or None, seed=cfg.seed)


def partition_task(pooled: Task, cfg: FederatedConfig, partition_id: int, num_partitions: int) -> Task:
    """One simulated site's share of the pooled training examples (IID or Dirichlet(α) over labels), with its
    held-out part for federated evaluation when that is on."""
    labels = [e["labels"] for e in pooled.train] if cfg.partitioning == "dirichlet" else None
    if labels is not None and pooled.kind != "classification":
        raise ValueError("partitioning 'dirichlet' splits by label and needs a classification task")
    indices = partition(len(pooled.train), num_partitions, partition_id, scheme=cfg.partitioning,
                        alpha=cfg.dirichlet_alpha, labels=labels, seed=cfg.seed)
    share = [pooled.train[i] for i in indices]
    train, held_out = hold_out(share, cfg.site_eval_fraction if cfg.federated_eval else 0.0, cfg.seed)
    return replace(pooled, train=train, eval=held_out)


def server_eval_task(cfg: FederatedConfig, tokenizer: PreTrainedTokenizerBase) -> Task | None:
    """The server's evaluation data: its own ``eval-path`` file, else the public test split of the run's data
    set, else None (no central evaluation). Never a training split."""
    if cfg.eval_path:
        task = file_task(cfg, tokenizer, cfg.eval_path, holdout=False)
        return replace(task, train=[], eval=task.train)
    if cfg.task in SITE_DATA_TASKS:
        return None
    return load_task(cfg.task, tokenizer, max_length=cfg.max_length, max_eval=cfg.max_eval or None, seed=cfg.seed,
                     eval_only=True)
