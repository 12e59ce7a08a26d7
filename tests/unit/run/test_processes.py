"""The orchestrator's small guards."""

import os
import signal
import threading
import time

import pytest


def test_ctrl_c_waits_for_the_block_even_with_other_threads():
    # the kernel may hand SIGINT to any thread: blocking it in the main thread alone would
    # not hold it back (seen with one extra thread); the block must finish first
    from flowrl_async.run.processes import no_interrupt

    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with no_interrupt():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the interrupt would land here without the guard
                finished.append(True)
    finally:
        stop.set()
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_admission_lets_actors_start_what_the_learner_takes_fresh_per_version():
    # a mixed batch of 8 at fresh_fraction 0.5 takes 4 never-trained groups a step: admitting
    # 8 a version piled up 4 a step, and the learner trained on ever older "fresh" groups
    from pathlib import Path

    from flowrl_async.config import TrainConfig
    from flowrl_async.run.processes import replay_config

    cfg = TrainConfig()
    assert (
        replay_config(cfg, Path("/tmp/r"), "tcp://x:1").groups_per_version == 8
    )  # fifo: all fresh
    cfg.replay.selector, cfg.replay.fresh_fraction, cfg.replay.max_times_sampled = "mixed", 0.5, 8
    assert replay_config(cfg, Path("/tmp/r"), "tcp://x:1").groups_per_version == 4
    cfg.learner.publish_every, cfg.replay.fresh_fraction = 2, 0.25
    assert replay_config(cfg, Path("/tmp/r"), "tcp://x:1").groups_per_version == 2 * 2
    cfg.replay.fresh_fraction = 0.0  # replay only: one fresh group a version still flows
    assert replay_config(cfg, Path("/tmp/r"), "tcp://x:1").groups_per_version == 2
