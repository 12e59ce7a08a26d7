"""Objective settings that would be silently ignored or contradict each other are refused at
start-up, each with a message naming the fields."""

import pytest

from flowrl_async.config import TrainConfig, validate


def refused(**changes) -> str:
    cfg = TrainConfig()
    for key, value in changes.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    with pytest.raises(ValueError) as e:
        validate(cfg)
    return str(e.value)


def test_settings_that_would_be_ignored_or_contradict_are_refused():
    assert "set algo.is_mode=off" in refused(algo__name="vargrad")  # default clip: no IS
    assert "learner.micro_batch=4 < generator.n=8" in refused(
        algo__name="vargrad", algo__is_mode="off", learner__micro_batch=4
    )
    assert "only algo.name=grpo takes it" in refused(algo__clip_ratio_c=3.0)
    assert "dual clip must be > 1" in refused(algo__name="grpo", algo__clip_ratio_c=0.5)
    assert "leave algo.is_level=sequence" in refused(algo__name="grpo", algo__is_level="geometric")
    assert "vargrad has no weights" in refused(algo__name="vargrad", algo__is_mode="off",
                                               algo__is_level="token")  # fmt: skip
    assert "only algo.name=grpo takes it" in refused(algo__loss_agg="token-mean")
    assert "algo.norm_len=0" in refused(algo__name="grpo", algo__norm_len=0)
    assert "divisor of loss_agg=seq-mean-token-sum-norm only" in refused(
        algo__name="grpo", algo__norm_len=100
    )
    assert "differs from generator.temperature" in refused(algo__temperature=0.7)
    assert "differs from generator.temperature" in refused(
        generator__temperature=1.5,
        algo__temperature=1.0,
        algo__reward_norm="raw",
        algo__is_mode="truncate",
    )
    assert "differs from generator.temperature" in refused(  # group-normalised rewards
        generator__temperature=1.5, algo__temperature=1.0, algo__is_mode="off"
    )
    assert "generator.temperature=0" in refused(generator__temperature=0.0)


def test_off_policy_tb_may_sample_hotter_than_it_trains():
    cfg = TrainConfig()
    cfg.generator.temperature, cfg.algo.temperature = 1.5, 1.0
    cfg.algo.reward_norm, cfg.algo.is_mode, cfg.replay.max_staleness = "raw", "off", None
    validate(cfg)


def test_the_presets_are_valid():
    for name, is_mode in (("vargrad", "off"), ("grpo", "clip"), ("flowrl", "clip"),
                          ("flowrl_no_z", "clip")):  # fmt: skip
        cfg = TrainConfig()
        cfg.algo.name, cfg.algo.is_mode = name, is_mode
        validate(cfg)
    cfg = TrainConfig()  # the FlowRL authors' CISPO-style variant, and DAPO's GRPO
    cfg.algo.is_level, cfg.algo.clip_high = "token", 0.28
    validate(cfg)
    cfg = TrainConfig()
    cfg.algo.name, cfg.algo.loss_agg, cfg.algo.clip_high = "grpo", "token-mean", 0.28
    validate(cfg)


def test_every_algo_preset_loads_and_validates():
    from pathlib import Path

    from omegaconf import OmegaConf

    from flowrl_async.learner.config import AlgoConfig

    presets = sorted((Path(__file__).parents[3] / "configs" / "algo").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"flowrl_cispo", "flowrl_no_z", "grpo_dapo", "vargrad"}
    for path in presets:
        cfg = TrainConfig()
        cfg.algo = AlgoConfig(**OmegaConf.to_container(OmegaConf.load(path)))
        validate(cfg)
