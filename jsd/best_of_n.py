"""Best-of-N: generate several candidates per returned image and keep the one the Japanese CLIP scores highest.

Returned image ``i`` of a request with ``num_candidates`` N draws its candidates from seeds
``seed + i·N … seed + i·N + N − 1`` (with N = 1 that is today's ``seed + i``). Each candidate is
scored against the prompt (its plain text: weight syntax removed) by :class:`jsd.japanese_clip.JapaneseCLIPScorer`;
candidates the safety checker flags are never chosen. Candidates are generated in batches of at most
:func:`candidates_per_batch` images, the request's pixel budget, so a larger N costs time, not memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from jsd.prompting import parse_prompt_weights

MAX_CANDIDATES = 8


@dataclass
class Candidate:
    """One generated candidate: which returned image it competes for, its seed, score and fate."""

    output: int
    seed: int
    score: float | None = None  # None: flagged by the safety checker, never scored
    nsfw: bool = False
    chosen: bool = False

    def metric(self) -> dict:
        """The candidate as recorded in a prediction's metrics."""
        score = None if self.score is None else round(self.score, 4)
        return {"output": self.output, "seed": self.seed, "score": score, "nsfw": self.nsfw, "chosen": self.chosen}


def candidate_seeds(seed: int, num_outputs: int, num_candidates: int) -> list[int]:
    """Every candidate's seed, returned image by returned image: ``seed + i·N + j``."""
    return [seed + i * num_candidates + j for i in range(num_outputs) for j in range(num_candidates)]


def candidates_per_batch(width: int, height: int, max_pixels: int) -> int:
    """How many ``width × height`` candidates one pipeline call may generate within ``max_pixels``."""
    return max(1, max_pixels // (width * height))


def batches(seeds: list[int], size: int) -> list[list[int]]:
    """``seeds`` cut into consecutive batches of at most ``size``."""
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


def scoring_text(prompt: str, *, prompt_weighting: bool) -> str:
    """The text the candidates are scored against: the prompt without ``(text:1.3)`` weight syntax."""
    if not prompt_weighting:
        return prompt
    return "".join(text for text, _ in parse_prompt_weights(prompt))


def choose(candidates: list[Candidate]) -> dict[int, Candidate]:
    """The best unflagged candidate of each returned image (ties: the lower seed); marks it ``chosen``.

    A returned image whose candidates were all flagged has no entry.
    """
    best: dict[int, Candidate] = {}
    for candidate in candidates:
        if candidate.nsfw or candidate.score is None:
            continue
        current = best.get(candidate.output)
        if current is None or candidate.score > current.score:
            best[candidate.output] = candidate
    for candidate in best.values():
        candidate.chosen = True
    return best
