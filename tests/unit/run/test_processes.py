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
