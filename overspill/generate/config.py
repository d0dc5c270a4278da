"""Generation settings, validated up front with one-line errors."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import OverspillError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0        # 0: greedy
    top_k: int = 0                  # 0: off
    top_p: float = 1.0              # 1.0: off
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019, eq. 1): divide positive logits, multiply negative
    num_beams: int = 1
    length_penalty: float = 1.0     # beam score = sum log p / generated_len ** length_penalty
    stop: list[str] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | list[int] | None = None  # int: every sequence alike; list: one per prompt; None: random per sequence

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "GenerationConfig":
        def bad(what: str) -> None:
            raise OverspillError(f"invalid generation setting: {what}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            bad(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and not self.greedy:
            bad("beam search is deterministic: use temperature=0 with num_beams > 1")
        if isinstance(self.seed, tuple):
            self.seed = list(self.seed)
        if not (self.seed is None or _is_int(self.seed)
                or (isinstance(self.seed, list) and self.seed and all(map(_is_int, self.seed)))):
            bad(f"seed must be an integer, a list of integers (one per prompt) or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop must be a list of non-empty strings, got {self.stop!r}")
        return self

    def check_batch(self, n: int) -> None:
        """A seed list must give one seed per prompt."""
        if isinstance(self.seed, list) and len(self.seed) != n:
            raise OverspillError(f"invalid generation setting: seed has {len(self.seed)} entries for {n} prompts "
                                 f"(give one per prompt, or one integer for all)")


def _is_int(x: object) -> bool:
    """An integer torch.Generator.manual_seed accepts (bool excluded)."""
    return isinstance(x, int) and not isinstance(x, bool) and -2**63 <= x < 2**64
