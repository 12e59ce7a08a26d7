"""Resume continues a run as it was configured: the saved config is the base, only what the
resume's command line names applies on top, and what the checkpoint holds cannot change."""

import json
from dataclasses import asdict

import pytest
from omegaconf import OmegaConf

from flowrl_async.cli import CONFIG_DIR
from flowrl_async.config import TrainConfig
from flowrl_async.run import resume


def saved_grpo_run(tmp_path) -> dict:
    cfg = TrainConfig(run_dir=str(tmp_path))
    cfg.algo.name, cfg.algo.kl_coef = "grpo", 0.05
    cfg.learner.lr, cfg.learner.steps = 3e-4, 100
    cfg.replay.max_staleness = 4
    (tmp_path / resume.SAVED).write_text(json.dumps(asdict(cfg)))
    return resume.saved_config(tmp_path)


def composed(overrides: list[str]):
    """What Hydra composes for ``flowrl-async train <overrides>``: the defaults plus them."""
    from hydra import compose, initialize_config_dir

    from flowrl_async.config import register

    register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_the_printed_command_continues_with_the_runs_own_settings(tmp_path):
    saved = saved_grpo_run(tmp_path)
    overrides = [f"run_dir={tmp_path}", "resume=true"]
    cfg = composed(overrides)  # the defaults: flowrl, lr 1e-4, staleness 1
    keys = resume.named_keys(overrides, CONFIG_DIR)
    assert keys == []  # run_dir and resume are not settings
    merged, changes = resume.resumed(saved, cfg, keys)
    assert changes == []
    assert merged["algo"]["name"] == "grpo" and merged["algo"]["kl_coef"] == 0.05
    assert merged["learner"]["lr"] == 3e-4 and merged["replay"]["max_staleness"] == 4
    assert merged["resume"] is True
    resume.check(saved, merged, tmp_path)  # nothing pinned changed


def test_named_overrides_apply_on_top_even_when_they_equal_the_defaults(tmp_path):
    saved = saved_grpo_run(tmp_path)
    # lr 1e-4 is the default but not the run's 3e-4: it was named, so it applies
    overrides = [f"run_dir={tmp_path}", "resume=true", "learner.steps=150", "learner.lr=1e-4"]
    overrides += ["task.kwargs.lengths=[2]", "replay=mixed"]
    merged, changes = resume.resumed(
        saved, composed(overrides), resume.named_keys(overrides, CONFIG_DIR)
    )
    assert merged["learner"]["steps"] == 150 and merged["learner"]["lr"] == 1e-4
    assert merged["task"]["kwargs"] == {"lengths": [2]}
    # replay=mixed sets the replay section as configs/replay/mixed.yaml defines it
    assert merged["replay"]["selector"] == "mixed" and merged["replay"]["max_staleness"] is None
    assert merged["replay"]["capacity"] == saved["replay"]["capacity"]
    assert merged["algo"] == saved["algo"]
    assert changes == [
        "learner.steps: 100 -> 150",
        "learner.lr: 0.0003 -> 0.0001",
        "task.kwargs.lengths: None -> [2]",
        "replay.max_staleness: 4 -> None",
        "replay.selector: 'fifo' -> 'mixed'",
        "replay.max_times_sampled: 1 -> 8",
        "replay.fresh_fraction: 1.0 -> 0.5",
    ]
    OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), merged))  # valid


def test_overrides_that_contradict_the_checkpoint_are_refused_by_name(tmp_path):
    saved = saved_grpo_run(tmp_path)
    overrides = [f"run_dir={tmp_path}", "resume=true", "algo=flowrl", "model.init_seed=3"]
    merged, _ = resume.resumed(saved, composed(overrides), resume.named_keys(overrides, CONFIG_DIR))
    with pytest.raises(ValueError) as e:
        resume.check(saved, merged, tmp_path)
    message = str(e.value)
    assert "algo.name: the run has 'grpo', the command line asks for 'flowrl'" in message
    assert "model.init_seed: the run has 0, the command line asks for 3" in message
    assert "start a new run_dir" in message


def test_a_directory_without_a_saved_config_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="run_config.json does not exist"):
        resume.saved_config(tmp_path)


def test_a_group_choice_sets_its_whole_section(tmp_path):
    # a replay=mixed run resumed with replay=default goes back to every replay default
    saved = saved_grpo_run(tmp_path)
    saved["replay"].update(selector="mixed", max_times_sampled=8, fresh_fraction=0.5)
    overrides = [f"run_dir={tmp_path}", "resume=true", "replay=default"]
    merged, changes = resume.resumed(
        saved, composed(overrides), resume.named_keys(overrides, CONFIG_DIR)
    )
    assert merged["replay"] == OmegaConf.to_container(OmegaConf.structured(TrainConfig).replay)
    assert "replay.selector: 'mixed' -> 'fifo'" in changes
    assert "replay.max_staleness: 4 -> 1" in changes
    assert merged["algo"] == saved["algo"]  # other sections stay the run's own


def test_a_run_saved_before_model_builtin_existed_resumes_with_the_tiny_model(tmp_path):
    saved = saved_grpo_run(tmp_path)
    del saved["model"]["builtin"]  # a run_config.json from before the key
    overrides = [f"run_dir={tmp_path}", "resume=true", "model=tiny"]
    merged, _ = resume.resumed(saved, composed(overrides), resume.named_keys(overrides, CONFIG_DIR))
    resume.check(saved, merged, tmp_path)  # nothing contradicts: it was the tiny model
    overrides = [f"run_dir={tmp_path}", "resume=true", "model=qwen2_0p5b_shape"]
    merged, _ = resume.resumed(saved, composed(overrides), resume.named_keys(overrides, CONFIG_DIR))
    with pytest.raises(ValueError, match="model.builtin: the run has 'tiny'"):
        resume.check(saved, merged, tmp_path)
