"""Why an actor died, in Ray's words: its memory monitor's kill is named as such."""

import os
import time

import pytest


def used_fraction() -> float:
    info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    total, available = (int(info[k].split()[0]) for k in ("MemTotal", "MemAvailable"))
    return 1 - available / total


@pytest.mark.integration
def test_an_actor_killed_by_rays_memory_monitor_is_reported_as_such():
    import tempfile

    import ray

    from flowrl_async.run.processes import memory_kill

    # the kill threshold ~3 GB above what the machine uses now (Ray itself takes ~1 GB of
    # it): the hog crosses it within seconds
    threshold = min(
        0.95,
        used_fraction() + 3.0 / (os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30),
    )
    os.environ["RAY_memory_usage_threshold"] = f"{threshold:.3f}"
    os.environ["RAY_memory_monitor_refresh_ms"] = "100"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray-oom-"),
    )  # short: Ray's socket paths
    try:

        @ray.remote(max_restarts=1, max_task_retries=0)
        class Hog:
            def ready(self):
                return True

            def hog(self):
                held = []
                while True:
                    held.append(bytearray(1 << 27))  # 128 MB a step, touched
                    time.sleep(0.02)

        hog = Hog.remote()
        ray.get(hog.ready.remote())
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(hog.hog.remote(), timeout=120)
        reason = memory_kill(ray, hog)
        assert reason is not None and reason.startswith("killed by Ray's memory monitor: "), reason
        assert "Memory on the node" in reason
        # an actor the monitor never killed is not confused with the one it did (checked at
        # once: the machine is back under the threshold now, another kill would be new)
        bystander = Hog.remote()
        ray.get(bystander.ready.remote())
        assert memory_kill(ray, bystander) is None
    finally:
        ray.shutdown()
        for key in ("RAY_memory_usage_threshold", "RAY_memory_monitor_refresh_ms"):
            os.environ.pop(key, None)
