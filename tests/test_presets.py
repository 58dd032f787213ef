"""Presets: what `dpmemarc train` runs when flags are left unset, and that every given flag wins."""

import pytest

from dpmemarc_core.cli.main import build_parser
from dpmemarc_core.cli.train import train_config_from_args
from dpmemarc_core.training.config import TrainConfig
from dpmemarc_core.training.presets import preset_config


def _config(*flags: str) -> TrainConfig:
    return train_config_from_args(build_parser().parse_args(["train", *flags]))


def test_no_flags_is_the_quick_preset_for_lora():
    cfg = _config()
    assert cfg == preset_config("quick", "lora", output="runs/quickstart")
    assert (cfg.method, cfg.batch_size, cfg.epochs, cfg.max_length, cfg.lr, cfg.head_lr) == ("lora", 128, 1.0, 48,
                                                                                            5e-3, 2e-2)
    assert cfg.method_options == {"r": 1} and cfg.max_train is None and cfg.max_eval is None


def test_paper_preset_is_the_library_default_with_the_papers_delta():
    cfg = _config("--preset", "paper", "--method", "rev")
    assert cfg == TrainConfig(method="rev", output="runs/quickstart", delta="1/N")
    assert _config("--preset", "paper", "--delta", "1e-6").delta == 1e-6
    assert _config().delta is None  # quick: the library's 1/(10N)


def test_flags_override_the_preset_and_options_merge():
    cfg = _config("--batch-size", "16", "--lr", "1e-4", "--max-train", "0", "--max-steps", "7",
                  "--method-option", "lora_alpha=2")
    assert (cfg.batch_size, cfg.lr, cfg.max_train, cfg.max_steps, cfg.epochs) == (16, 1e-4, None, 7, None)
    assert cfg.method_options == {"r": 1, "lora_alpha": 2}
    assert _config("--method-option", "r=4").method_options == {"r": 4}


def test_methods_without_a_tuned_entry_keep_the_paper_lr_and_options():
    cfg = preset_config("quick", "zo")
    assert cfg.lr is None and cfg.head_lr is None and cfg.method_options == {} and cfg.batch_size == 128


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_config("fast")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--preset", "fast"])


def test_long_preset_is_quick_at_four_times_the_batch_over_four_epochs():
    quick, long = _config("--method", "adapter"), _config("--preset", "long", "--method", "adapter")
    assert (long.batch_size, long.epochs) == (4 * quick.batch_size, 4 * quick.epochs)
    assert long == TrainConfig(**{**quick.__dict__, "batch_size": long.batch_size, "epochs": long.epochs})
    assert _config("--preset", "long", "--epochs", "2").epochs == 2


def test_long_preset_trains_the_side_network_sixteen_epochs():
    # its later epochs run on cached backbone states (chosen on validation; presets._LONG_EPOCHS_OF)
    quick, long = _config("--method", "side"), _config("--preset", "long", "--method", "side")
    assert (long.batch_size, long.epochs) == (4 * quick.batch_size, 16 * quick.epochs)
    assert long.probe_fraction == quick.probe_fraction == 0.75  # its head alone first (probe_first.py)
    assert long == TrainConfig(**{**quick.__dict__, "batch_size": long.batch_size, "epochs": long.epochs})
    assert _config("--preset", "long", "--method", "side", "--epochs", "4").epochs == 4
    assert _config("--preset", "long", "--method", "side", "--probe-fraction", "0").probe_fraction == 0
    # private classification runs only: no noise to spare the side network, no head to probe in generation
    assert _config("--preset", "long", "--method", "side", "--epsilon", "inf").probe_fraction == 0
    assert _config("--method", "side", "--epsilon", "inf").probe_fraction == 0
    assert _config("--preset", "long", "--method", "side", "--task", "snli-generation").probe_fraction == 0
    assert _config("--preset", "long", "--method", "lora").probe_fraction == 0
    assert _config("--preset", "paper", "--method", "side").probe_fraction == 0
    assert _config("--preset", "long", "--method", "lora").epochs == 4


def test_clip_groups_flag_reaches_the_config():
    assert _config().clip_groups == "all"
    assert _config("--clip-groups", "head").clip_groups == "head"
    # full fine-tuning's preset clips its classifier head apart; a flag wins; generation has no head to clip
    assert _config("--method", "full").clip_groups == "head"
    assert _config("--preset", "long", "--method", "full").clip_groups == "head"
    assert _config("--method", "full", "--clip-groups", "all").clip_groups == "all"
    assert _config("--method", "full", "--task", "e2e").clip_groups == "all"
    assert _config("--preset", "paper", "--method", "full").clip_groups == "all"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--clip-groups", "layer"])
