"""The rollout actors' choice lists, named once (validated by the run config)."""

ENGINES = ("vllm", "torch")
KV_MODES = ("keep", "recompute")  # generator.inflight_kv
