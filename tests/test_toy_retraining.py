"""The committed toy checkpoint stays reproducible: the first steps of its build, rerun, give the logged losses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from jsd.toyworld import TOY_DIR, TOY_WEIGHTS
from jsd.toyworld.build import LOG_FILE, Plan, build

REPO = Path(__file__).resolve().parents[1]
LOG = REPO / TOY_DIR / LOG_FILE
FIRST_STEPS = 8


@pytest.mark.slow
@pytest.mark.retraining
@pytest.mark.skipif(not LOG.is_file(), reason="no toy checkpoint training log in toy/")
def test_the_first_vae_steps_of_the_toy_build_match_the_committed_log(tmp_path):
    logged = json.loads(LOG.read_text(encoding="utf-8"))
    plan = Plan(**{**logged["plan"], "stages": [tuple(stage) for stage in logged["plan"]["stages"]]})
    assert dataclasses.asdict(plan) == logged["plan"] | {"stages": plan.stages}
    tokenizer = REPO / TOY_WEIGHTS / "tokenizer" / "spiece.model"
    work, weights = tmp_path / "work", tmp_path / "weights"
    rerun = build(REPO, work, weights, tokenizer, plan, stop_after="vae", vae_stop_at=FIRST_STEPS, progress=print)
    want = [entry["loss"] for entry in logged["steps"] if entry["stage"] == "vae"][:FIRST_STEPS]
    got = [entry["loss"] for entry in rerun["steps"] if entry["stage"] == "vae"]
    assert got == pytest.approx(want, rel=1e-3, abs=1e-5)
