"""Shared fixtures: tiny seeded checkpoints in the served layout, and rinna's real tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jsd.tiny import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JSD_SHARED", REPO.parent / "shared"))
RINNA_SPIECE = SHARED / "data" / "tokenizer" / "google_sp.model"
CAPTIONS = SHARED / "data" / "captions" / "captions_ja.txt"


@pytest.fixture(scope="session")
def rinna_spiece() -> Path:
    """rinna's real sentencepiece model from ../shared (skipped where it is absent)."""
    if not RINNA_SPIECE.is_file():
        pytest.skip(f"rinna's tokenizer is not at {RINNA_SPIECE}")
    return RINNA_SPIECE


@pytest.fixture(scope="session")
def captions() -> list[str]:
    """500 real Japanese captions (JGLUE / YJ Captions, CC BY-SA 4.0) from ../shared."""
    if not CAPTIONS.is_file():
        pytest.skip(f"the shared captions are not at {CAPTIONS}")
    return [line for line in CAPTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Tiny seeded checkpoint with the project's own tokenizer. Treat as read-only."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "weights")


@pytest.fixture(scope="session")
def rinna_checkpoint(tmp_path_factory, rinna_spiece) -> Path:
    """Tiny seeded checkpoint with rinna's real 32,000-piece tokenizer. Treat as read-only."""
    return make_checkpoint(tmp_path_factory.mktemp("rinna-tiny") / "weights", tokenizer_model=rinna_spiece)


@pytest.fixture(scope="session")
def tiny_scorer(tmp_path_factory) -> Path:
    """Tiny seeded Japanese CLIP scorer folder (served layout, with manifest). Treat as read-only."""
    from jsd.tiny import write_tiny_scorer

    return write_tiny_scorer(tmp_path_factory.mktemp("scorer") / "japanese_clip", kind="clip", seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: tiny tensors gain nothing from more, CI shares its 2 cores,
    and on a busy CPU spinning threads make each call many times slower. Restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
