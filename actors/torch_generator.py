"""TorchGenerator: a plain PyTorch KV-cache sampler with the Generator interface.

The light fallback and the engine of fast unit tests. Log-probs are those of the sampled
distribution: log_softmax(logits / temperature), renormalised over the top-p nucleus when
top_p < 1. Finished rows keep stepping (cheaper than re-batching) but their extra tokens are
dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from flowrl_async.actors.generator import Completion, SampleSpec


def nucleus_logprobs(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches top_p; renormalise; -inf elsewhere."""
    if top_p >= 1.0:
        return logprobs
    sorted_lp, order = logprobs.sort(-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    kept = logprobs.masked_fill(drop, float("-inf"))
    return kept - kept.logsumexp(-1, keepdim=True)


class TorchGenerator:
    """A plain PyTorch sampler with a KV cache (tests and small models)."""

    def __init__(self, model, eos_token_id: int, pad_token_id: int, seed: int = 0):
        self.model = model.eval()
        self.eos, self.pad = eos_token_id, pad_token_id
        self.rng = torch.Generator().manual_seed(seed)
        self.active: dict = {}  # streaming: key -> _Group in flight
        self.stepped_tokens = 0  # tokens streams have sampled (one per running sequence a step)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], spec: SampleSpec
    ) -> list[list[Completion]]:
        rng = torch.Generator().manual_seed(spec.seed) if spec.seed is not None else self.rng
        rows = [list(p) for p in prompts for _ in range(spec.n)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows])
        attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        tokens, logps = [], []
        done = torch.zeros(len(rows), dtype=torch.bool)
        for _ in range(spec.max_tokens):
            lp = nucleus_logprobs(
                torch.log_softmax(out.logits[:, -1].float() / spec.temperature, -1), spec.top_p
            )
            tok = torch.multinomial(lp.exp(), 1, generator=rng).squeeze(-1)
            tokens.append(tok)
            logps.append(lp.gather(-1, tok[:, None]).squeeze(-1))
            done |= tok == self.eos
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones(len(rows), 1, dtype=attn.dtype)], -1)
            pos = pos[:, -1:] + 1
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=attn,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        completions = _completions(torch.stack(tokens, 1), torch.stack(logps, 1), self.eos)
        return [completions[i * spec.n : (i + 1) * spec.n] for i in range(len(prompts))]

    # ---- streaming: groups in flight, one token per step (actors/streaming.py) ----

    def submit(self, key, prompt: Sequence[int], spec: SampleSpec) -> None:
        """Start one group: ``spec.n`` responses to ``prompt``, advanced by ``step`` (its
        prompt is read at the first step, as a vLLM engine's is)."""
        rng = torch.Generator().manual_seed(spec.seed) if spec.seed is not None else self.rng
        self.active[key] = _Group(spec, rng, torch.tensor([list(prompt)] * spec.n))

    def in_flight(self) -> int:
        return len(self.active)

    def progress(self) -> dict[object, list[int]]:
        """Tokens sampled so far by each response of every group in flight."""
        return {key: [len(g.tokens)] * len(g.done) for key, g in self.active.items()}

    def recompute_in_flight(self) -> None:
        """Drop every group's keys and values: its next step feeds the prompt and all its
        tokens so far again, under the weights loaded now."""
        for g in self.active.values():
            if g.cache is not None:
                g.feed = torch.cat([g.prompt, torch.stack(g.tokens, 1)], 1)
                g.cache = None

    def abort_all(self) -> None:
        self.active.clear()

    @torch.no_grad()
    def step(self) -> list[tuple[object, list[Completion]]]:
        """One token for every response in flight, from the weights loaded now (the keys and
        values of earlier tokens stay as they were computed); -> the groups that finished."""
        finished = []
        for key, g in list(self.active.items()):
            spec = g.spec
            if g.cache is None:  # the prompt (and tokens so far, after a recompute)
                out = self.model(input_ids=g.feed, use_cache=True)
                g.length = g.feed.shape[1]
            else:  # the last sampled token
                out = self.model(input_ids=g.feed, past_key_values=g.cache, use_cache=True,
                                 position_ids=torch.full((len(g.feed), 1), g.length))  # fmt: skip
                g.length += 1
            g.cache = out.past_key_values
            lp = nucleus_logprobs(torch.log_softmax(out.logits[:, -1].float() / spec.temperature, -1),
                                  spec.top_p)  # fmt: skip
            tok = torch.multinomial(lp.exp(), 1, generator=g.rng).squeeze(-1)
            tok = torch.where(g.done, torch.full_like(tok, self.eos), tok)
            self.stepped_tokens += int((~g.done).sum())
            g.tokens.append(tok)
            g.logps.append(lp.gather(-1, tok[:, None]).squeeze(-1))
            g.done |= tok == self.eos
            if bool(g.done.all()) or len(g.tokens) == spec.max_tokens:
                tokens, logps = torch.stack(g.tokens, 1), torch.stack(g.logps, 1)
                finished.append((key, _completions(tokens, logps, self.eos)))
                del self.active[key]
            else:
                g.feed = tok[:, None]
        return finished

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = dict(named_tensors)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [
            k
            for k in missing
            if not (k == "lm_head.weight" and self.model.config.tie_word_embeddings)
        ]
        if missing or unexpected:
            raise KeyError(
                f"weights do not fit the model: missing {missing}, unexpected {unexpected}"
            )

    @torch.no_grad()
    def probe_logprob(self, token_ids: Sequence[int]) -> float:
        ids = torch.tensor([list(token_ids)])
        logits = self.model(input_ids=ids).logits[0, :-1].float()
        return float(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).sum())


class _Group:
    """One group in flight: what its rows feed next, their KV cache and tokens so far."""

    def __init__(self, spec: SampleSpec, rng, prompt: torch.Tensor):
        self.spec, self.rng, self.feed, self.cache = spec, rng, prompt, None
        self.prompt = prompt
        self.length = prompt.shape[1]  # the position of the next token fed
        self.tokens: list[torch.Tensor] = []
        self.logps: list[torch.Tensor] = []
        self.done = torch.zeros(len(prompt), dtype=torch.bool)


def _completions(tokens: torch.Tensor, logps: torch.Tensor, eos: int) -> list[Completion]:
    """Each row of sampled tokens [rows, T] cut after its first eos."""
    tok_mat, lp_mat = tokens.numpy(), logps.numpy()
    out = []
    for i in range(len(tok_mat)):
        eos_at = np.flatnonzero(tok_mat[i] == eos)
        end = int(eos_at[0]) + 1 if len(eos_at) else tok_mat.shape[1]
        out.append(Completion(tok_mat[i, :end].astype(np.int32), lp_mat[i, :end].astype(np.float32),
                              "stop" if len(eos_at) else "length"))  # fmt: skip
    return out
