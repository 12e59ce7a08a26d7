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

    # Python's own Ctrl-C handler, whatever this process inherited (pytest started as a
    # background job has SIGINT ignored, and then Python installs none)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
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
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        stop.set()
        signal.signal(signal.SIGINT, inherited)
    assert finished == [True]


def test_an_ignored_ctrl_c_stays_ignored_after_the_block():
    from flowrl_async.run.processes import no_interrupt

    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup ... &
    try:
        finished = []
        with no_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            finished.append(True)
        time.sleep(0.1)  # nothing is delivered after the block either
        assert finished == [True]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)
