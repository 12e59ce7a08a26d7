"""A tabular autoregressive policy over all sequences of length L from a vocabulary of V tokens.

Every prefix has its own row of logits, so the policy can represent any distribution over the
V**L sequences: small enough to enumerate, rich enough that an objective's optimum is reachable.
"""

import itertools

import torch


class TabularPolicy(torch.nn.Module):
    def __init__(self, vocab: int, length: int, seed: int, scale: float = 1.0):
        super().__init__()
        self.vocab, self.length = vocab, length
        self.prefixes = {
            p: i
            for i, p in enumerate(
                p for n in range(length) for p in itertools.product(range(vocab), repeat=n)
            )
        }
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.nn.Parameter(
            scale * torch.randn(len(self.prefixes), vocab, generator=g, dtype=torch.float64)
        )

    def all_sequences(self) -> torch.Tensor:
        return torch.tensor(list(itertools.product(range(self.vocab), repeat=self.length)))

    def token_logprobs(self, sequences: torch.Tensor) -> torch.Tensor:
        """[N, L] token ids -> [N, L] log π(y_t | y_<t)."""
        rows = [
            [self.prefixes[tuple(seq[:t].tolist())] for t in range(self.length)]
            for seq in sequences
        ]
        logp = torch.log_softmax(self.logits, -1)[torch.tensor(rows)]
        return logp.gather(-1, sequences[..., None]).squeeze(-1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        out = torch.zeros(n, self.length, dtype=torch.long)
        with torch.no_grad():
            probs = torch.softmax(self.logits, -1)
            for i in range(n):
                for t in range(self.length):
                    row = probs[self.prefixes[tuple(out[i, :t].tolist())]]
                    out[i, t] = torch.multinomial(row, 1, generator=generator)
        return out

    def distribution(self) -> torch.Tensor:
        """Probabilities of all_sequences(), in order."""
        with torch.no_grad():
            return self.token_logprobs(self.all_sequences()).sum(-1).exp()
