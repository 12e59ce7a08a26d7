"""The rollout actors' choice lists, named once (validated by the run config)."""

ENGINES = ("vllm", "torch")
