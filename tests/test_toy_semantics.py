"""What the committed toy checkpoint's images show, read by the toy world's pixel judge (docs/toy-world.md).

The thresholds are the issue's (#22); the figures measured on the committed checkpoint are recorded in
docs/toy-world.md. A threshold the committed checkpoint does not reach is marked ``xfail(strict=True)``
with the measured figure, never lowered: a checkpoint that reaches it turns the mark into a failure, so
the mark goes when the figure is reached.
"""

from __future__ import annotations

import itertools
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from repofiles import load_repo_module

from jsd.serving import ImageGenerator, load_pipeline
from jsd.toyworld import TOY_DIR, TOY_WEIGHTS, judge, world
from jsd.toyworld.build import LOG_FILE, Plan
from jsd.toyworld.measure import draw, sample_scenes

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / TOY_WEIGHTS
pytestmark = pytest.mark.skipif(not (WEIGHTS / "manifest.json").is_file(), reason="no toy checkpoint in toy/weights")
STEPS = 25


@cache
def training_log() -> dict:
    path = REPO / TOY_DIR / LOG_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def reached(ok: bool, figure: str):
    """``xfail(strict=True)`` when the build's recorded figure misses the threshold: the test still runs, and a
    checkpoint that reaches the threshold makes it fail until the mark is removed."""
    if ok:
        return lambda f: f
    return pytest.mark.xfail(strict=True, reason=f"the committed toy checkpoint measured {figure}")


def recorded(attribute: str, threshold: float):
    value = training_log().get("adherence", {}).get("seen", {}).get(attribute)
    return reached(value is None or value >= threshold, f"{attribute} {value or 0:.0%} < {threshold:.0%}")


def rose(earlier: float, later: float) -> bool:
    """At least one more reading right on the build's prompts: the log rounds shares to 4 decimals, so a tie
    can differ by 1e-4 (0.9583 vs 0.9584 in the sixth build) and must not count as a rise."""
    return later - earlier > 0.5 / Plan().eval_prompts


def stages_teach() -> bool:
    score = [e["color"] + e["shape"] + e["position"] for e in training_log().get("stage_adherence", [])]
    return not score or all(rose(earlier, later) for earlier, later in itertools.pairwise(score))


def full_build():
    """xfail(strict=True) for the reduced committed build (docs/toy-world.md: it draws blobs, not shapes yet)."""
    vae_steps = training_log().get("plan", {}).get("vae_steps", Plan().vae_steps)
    return reached(vae_steps >= Plan().vae_steps, f"a reduced build (VAE {vae_steps} steps): this test failed on it")


@cache
def generator() -> ImageGenerator:
    return ImageGenerator(load_pipeline(WEIGHTS, device="cpu"))


@cache
def seen_adherence() -> dict[str, float]:
    """The build's own sample of seen scenes (Plan.eval_prompts at seed + 1), drawn at 25 steps."""
    plan = Plan()
    chosen = sample_scenes(plan.eval_prompts, seed=plan.seed + 1)
    return judge.agreement(draw(generator(), chosen, steps=STEPS), chosen)


@recorded("color", 0.9)
def test_color_follows_the_prompt():
    assert seen_adherence()["color"] >= 0.9, seen_adherence()


@recorded("shape", 0.7)
def test_shape_follows_the_prompt():
    assert seen_adherence()["shape"] >= 0.7, seen_adherence()


@recorded("position", 0.8)
def test_position_follows_the_prompt():
    assert seen_adherence()["position"] >= 0.8, seen_adherence()


@reached(stages_teach(), "no rise in adherence at every stage (toy/training-log.json)")
def test_each_stage_raised_adherence():
    """The build measured every stage's output with the judge (toy/training-log.json): the recipe teaches."""
    by_stage = training_log()["stage_adherence"]
    names = [entry["name"] for entry in by_stage]
    assert names == ["start", *(stage[0] for stage in Plan().stages)]
    score = [entry["color"] + entry["shape"] + entry["position"] for entry in by_stage]
    assert all(rose(earlier, later) for earlier, later in itertools.pairwise(score)), by_stage


@full_build()
def test_guidance_scale_7_5_follows_the_prompt_better_than_1():
    chosen = sample_scenes(6, seed=2)
    weak = judge.agreement(draw(generator(), chosen, guidance_scale=1.0), chosen)
    strong = judge.agreement(draw(generator(), chosen, guidance_scale=7.5), chosen)
    assert strong["color"] + strong["position"] > weak["color"] + weak["position"], (weak, strong)


@full_build()
def test_a_negative_prompt_naming_a_color_lowers_its_share():
    """Prompts that leave the color open (no color word); 赤 named in the negative prompt."""
    chosen = [s for s in sample_scenes(40, seed=3) if s.background != "黒"][:6]
    prompts = [s.prompt().replace(world.COLOR_WORDS[s.color][0], "赤い") for s in chosen]  # asks for 赤 …

    def red_share(negative: str) -> float:
        images = draw(generator(), chosen, prompts=prompts, negative_prompt=negative)
        return sum(judge.read(image).color == "赤" for image in images) / len(images)

    assert red_share("赤い") < red_share("")  # … and 赤 in the negative prompt fights it


@full_build()
def test_img2img_keeps_shape_and_position_at_low_strength_and_follows_the_prompt_at_1():
    source = world.Scene("白", "青", "四角", "左", "大きい")
    target = world.Scene("白", "赤", "丸", "右", "大きい")
    image = world.render(source)
    low = draw(generator(), [target], image=image, prompt_strength=0.3)[0]
    full = draw(generator(), [target], image=image, prompt_strength=1.0)[0]
    kept = judge.read(low)
    assert (kept.shape, kept.position) == (source.shape, source.position), kept
    followed = judge.read(full)
    assert followed.position == target.position or followed.color == target.color, followed


@full_build()
def test_inpainting_changes_the_masked_area_only():
    source = world.render(world.Scene("白", "青", "四角", "左", "大きい"))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (64, 0, 128, 128))  # the right half is repainted
    out = draw(generator(), [world.Scene("白", "赤", "丸", "右", "大きい")], image=source, mask=mask)[0]
    before, after = np.asarray(source, dtype=np.float32), np.asarray(out, dtype=np.float32)
    outside = np.abs(after[:, :56] - before[:, :56]).mean()
    inside = np.abs(after[:, 72:] - before[:, 72:]).mean()
    assert outside < 12, outside  # the VAE's round trip, nothing more
    assert inside > 2 * outside, (inside, outside)


def test_the_committed_checkpoint_is_small_verified_and_carries_rinnas_tokenizer_with_its_notice():
    from jsd.manifest import sha256_file, verify_manifest

    manifest = verify_manifest(WEIGHTS)
    assert manifest["source"].startswith("jsd.toyworld") and "not rinna's" in manifest["source"]
    assert sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file()) <= 15 * 1024 * 1024
    notice = (WEIGHTS / "tokenizer" / "NOTICE.md").read_text(encoding="utf-8")
    assert sha256_file(WEIGHTS / "tokenizer" / "spiece.model") in notice  # the NOTICE names the file's sha256


def test_download_weights_toy_copies_it_and_verify_only_refuses_it_as_the_model(tmp_path, capsys):
    script = load_repo_module("scripts/download_weights.py")
    dest = tmp_path / "weights"
    assert script.main(["--toy", "--dest", str(dest)]) == 0
    assert "toy model of shapes" in capsys.readouterr().out
    assert script.main(["--verify-only", str(dest)]) == 1
    assert "not the model" in capsys.readouterr().err
    assert script.main(["--verify-only", str(dest), "--allow-tiny"]) == 0
