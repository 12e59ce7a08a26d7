"""``flowrl-async simulate calibrate RUN``: a cost file fitted to a real run's figures.

From RUN/summary.json (each streaming actor's engine-step sums, verify, push and load times),
RUN/metrics.jsonl (the learner's step, wait and publish times and tokens) and RUN/replay (the
response and prompt lengths of every stored group):

    engine step      least squares of step time on running sequences over every actor's
                     steps (sums kept by the actor: n, Σk, Σk², Σt, Σk·t)
    verify_s         (verify + push time) per group
    load_s           load time (the probe included) per load
    train            base 0, per response token and rank: Σ(step − wait − publish) / Σ tokens,
                     times the run's learner ranks (each trained 1/L of the batch)
    publish          mean time of the steps that published (a fixed cost: publish_bytes 0)
    lengths          the histogram of stored response lengths; prompt_tokens their mean

The fit describes the machine the run used, contention included: it predicts runs of the
same processes on the same machine (other staleness, buffer or admission settings).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from flowrl_async.run.sim.costs import Costs


def fit_steps(actors: list[dict]) -> tuple[float, float]:
    """(a, b) of step time = a + b·k from the actors' sums (b = 0 if k never varied)."""
    n = sum(a["step_n"] for a in actors)
    sk, skk = sum(a["step_k"] for a in actors), sum(a["step_kk"] for a in actors)
    st, skt = sum(a["step_t"] for a in actors), sum(a["step_kt"] for a in actors)
    if n == 0:
        raise ValueError("no engine steps recorded")
    var = skk - sk * sk / n
    if var <= 1e-9 * max(1.0, skk):
        return st / n, 0.0
    b = (skt - sk * st / n) / var
    a = (st - b * sk) / n
    if a < 0 or b < 0:  # noise on a flat cost: the mean alone
        return st / n, 0.0
    return a, b


def learner_ranks(run: Path) -> int:
    """The run's learner.world_size (1 when its config cannot be read)."""
    try:
        return int(json.loads((run / "run_config.json").read_text())["learner"]["world_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return 1


def calibrate(run: str | Path) -> Costs:
    from flowrl_async.replay.reader import stored_groups
    from flowrl_async.run.progress import read_metrics

    run = Path(run)
    summary = json.loads((run / "summary.json").read_text())
    actors = [a for a in summary.get("actors", []) if a]
    if not any(a.get("step_n") for a in actors):
        raise ValueError(f"{run}: no streaming actor's engine-step figures in summary.json "
                         "(calibrate needs a run with generator.streaming=true, the default)")  # fmt: skip
    step_s, per_seq = fit_steps([a for a in actors if a.get("step_n")])
    groups = sum(a["groups"] for a in actors)
    rows = read_metrics(run / "metrics.jsonl")
    train = sum(r["step_s"] - r["wait_s"] - r.get("publish_s", 0.0) for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    ranks = learner_ranks(run)
    published = [r["publish_s"] for r in rows if r.get("publish_s", 0.0) > 0]
    lengths, prompts = Counter(), []
    for g, _, _ in stored_groups(run / "replay"):
        prompts.append(len(g.prompt_token_ids))
        lengths.update(max(1, len(r.token_ids)) for r in g.responses)
    loads = sum(a["weight_loads"] for a in actors)
    return Costs(
        step_s=step_s, step_per_seq_s=per_seq,
        verify_s=sum(a["verify_s"] + a["push_s"] for a in actors) / max(1, groups),
        load_s=sum(a["load_s"] for a in actors) / max(1, loads),
        train_base_s=0.0, train_per_token_s=ranks * train / max(1.0, tokens),
        publish_base_s=sum(published) / max(1, len(published)),
        prompt_tokens=round(sum(prompts) / max(1, len(prompts))),
        lengths=[[n, c] for n, c in sorted(lengths.items())],
        source=f"calibrated from {run}",
    )  # fmt: skip
