"""Best-of-N (`num_candidates`): the best-scoring candidates are returned, N = 1 is plain generation, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from repofiles import load_repo_module

from jsd import best_of_n, serving
from jsd.japanese_clip import SCORER_FOLDER, JapaneseCLIPScorer, ScorerError
from jsd.serving import GenerationRequest, InputError, NSFWError

FAST = {"width": 128, "height": 128, "num_inference_steps": 2, "prompt": "赤い帽子の猫"}


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    return serving.load_pipeline(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def scorer(tiny_scorer):
    return JapaneseCLIPScorer.from_pretrained(tiny_scorer, device="cpu")


@pytest.fixture(scope="module")
def generator(pipeline, scorer):
    return serving.ImageGenerator(pipeline, model_revision="tiny", scorer=scorer)


@pytest.fixture(scope="module")
def plain(pipeline):
    return serving.ImageGenerator(pipeline, model_revision="tiny")


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_best_of_n_returns_the_highest_scoring_candidates(generator, plain, scorer):
    """Every candidate regenerated alone from its seed and scored independently: the argmax is what came back."""
    result = generator.generate(GenerationRequest(**FAST, num_outputs=2, num_candidates=3, seed=100))

    seeds = list(range(100, 106))
    assert [c.seed for c in result.candidates] == seeds and result.seeds == seeds
    alone = [plain.generate(GenerationRequest(**FAST, seed=s)).images[0].image for s in seeds]
    scores = scorer.score(alone, [FAST["prompt"]] * len(alone)).numpy()
    np.testing.assert_allclose([c.score for c in result.candidates], scores, atol=0.05)
    expected = [seeds[3 * i + int(np.argmax(scores[3 * i : 3 * i + 3]))] for i in range(2)]
    assert [item.seed for item in result.images] == expected
    assert expected != [100, 103]  # not simply each image's first candidate (the test would not see that bug)
    assert [c.seed for c in result.candidates if c.chosen] == expected
    for item in result.images:
        assert np.abs(_pixels(item.image) - _pixels(alone[seeds.index(item.seed)])).max() <= 2
        assert item.metadata["seed"] == str(item.seed) and item.metadata["num_candidates"] == "3"
        assert float(item.metadata["clip_score"]) == pytest.approx(scores[seeds.index(item.seed)], abs=0.05)
    assert [item.index for item in result.images] == [0, 1]


def test_one_candidate_is_todays_output_byte_for_byte(generator, plain, tmp_path):
    """num_candidates=1 with a scorer loaded == a request that never heard of candidates, file bytes included."""
    today = plain.generate(GenerationRequest(**FAST, num_outputs=2, seed=7)).save(tmp_path / "today")
    one = generator.generate(GenerationRequest(**FAST, num_outputs=2, seed=7, num_candidates=1))
    assert one.candidates == []
    paths = one.save(tmp_path / "one")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in today]


def test_candidates_are_generated_in_batches_within_the_pixel_budget(generator, monkeypatch):
    monkeypatch.setattr(serving, "MAX_PIXELS", 2 * 128 * 128)
    calls = []
    real_run = serving.ImageGenerator._run

    def spy(self, pipe, checked, seeds=None):
        calls.append(seeds)
        return real_run(self, pipe, checked, seeds=seeds)

    monkeypatch.setattr(serving.ImageGenerator, "_run", spy)
    result = generator.generate(GenerationRequest(**FAST, num_outputs=1, num_candidates=5, seed=3))
    assert calls == [[3, 4], [5, 6], [7]]
    assert len(result.images) == 1 and len(result.candidates) == 5


def test_flagged_candidates_are_never_chosen(generator, pipeline, monkeypatch):
    flagged_seeds = {20, 21, 23}  # image 0 keeps only seed 22; image 1 only seed 24... and 25
    real_run = serving.ImageGenerator._run

    def flag(self, pipe, checked, seeds=None):
        output = real_run(self, pipe, checked, seeds=seeds)
        output.nsfw_content_detected = [s in flagged_seeds for s in seeds]
        return output

    monkeypatch.setattr(serving.ImageGenerator, "_run", flag)
    result = generator.generate(GenerationRequest(**FAST, num_outputs=2, num_candidates=3, seed=20))
    assert result.images[0].seed == 22 and result.images[1].seed in (24, 25)
    assert sorted(result.flagged_seeds) == sorted(flagged_seeds)
    assert all(c.score is None for c in result.candidates if c.nsfw)

    flagged_seeds.update(range(20, 26))
    with pytest.raises(NSFWError, match=r"All 6 candidate\(s\) were flagged"):
        generator.generate(GenerationRequest(**FAST, num_outputs=2, num_candidates=3, seed=20))


def test_without_a_scorer_more_candidates_are_refused_naming_the_input(plain, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("no model work for a refused request")

    monkeypatch.setattr(serving.ImageGenerator, "_assemble", no_model_work)
    with pytest.raises(
        InputError, match=r"`num_candidates` is 2, but this model has no Japanese CLIP scorer.*japanese_clip/"
    ):
        plain.generate(GenerationRequest(**FAST, num_candidates=2))


@pytest.mark.parametrize("value", [0, best_of_n.MAX_CANDIDATES + 1, 1.5, True])
def test_num_candidates_out_of_range_is_refused(generator, value):
    with pytest.raises(InputError, match=rf"`num_candidates` must be .*between 1 and {best_of_n.MAX_CANDIDATES}"):
        generator.generate(GenerationRequest(**FAST, num_candidates=value))


def test_candidates_are_scored_against_the_prompt_without_weight_syntax():
    assert best_of_n.scoring_text("(赤い:1.3)帽子と\\(猫\\)", prompt_weighting=True) == "赤い帽子と(猫)"
    assert best_of_n.scoring_text("(赤い:1.3)帽子", prompt_weighting=False) == "(赤い:1.3)帽子"


def test_choose_takes_the_highest_score_and_the_lower_seed_on_ties():
    candidates = [
        best_of_n.Candidate(output=0, seed=1, score=10.0),
        best_of_n.Candidate(output=0, seed=2, score=30.0),
        best_of_n.Candidate(output=0, seed=3, score=30.0),
        best_of_n.Candidate(output=1, seed=4, score=None, nsfw=True),
        best_of_n.Candidate(output=1, seed=5, score=5.0),
    ]
    best = best_of_n.choose(candidates)
    assert {k: c.seed for k, c in best.items()} == {0: 2, 1: 5}
    assert [c.chosen for c in candidates] == [False, True, False, False, True]


# ---- predict.py ----------------------------------------------------------------------------------------------


@pytest.fixture
def weights_with_scorer(tiny_checkpoint, tiny_scorer, tmp_path) -> Path:
    weights = Path(shutil.copytree(tiny_checkpoint, tmp_path / "weights"))
    shutil.copytree(tiny_scorer, weights / SCORER_FOLDER)
    return weights


def _predictor(weights: Path, monkeypatch):
    monkeypatch.setenv("JSD_WEIGHTS", str(weights))
    predictor = load_repo_module("predict.py").Predictor()
    predictor.setup()
    return predictor


def _run_defaults() -> dict:
    import inspect

    signature = inspect.signature(load_repo_module("predict.py").Predictor.run)
    values = {name: p.default.default for name, p in signature.parameters.items() if name != "self"}
    return values | {k: v for k, v in FAST.items()} | {"output_format": "png"}


def test_predictor_records_each_candidates_seed_and_score(weights_with_scorer, monkeypatch):
    predictor = _predictor(weights_with_scorer, monkeypatch)
    assert predictor.generator.scorer is not None
    recorded = {}
    monkeypatch.setattr(predictor, "record_metric", lambda key, value, mode="replace": recorded.update({key: value}))

    paths = predictor.run(**_run_defaults() | {"num_outputs": 1, "num_candidates": 3, "seed": 5})

    assert len(paths) == 1 and recorded["seeds"] == [5, 6, 7]
    candidates = recorded["candidates"]
    assert [c["seed"] for c in candidates] == [5, 6, 7] and sum(c["chosen"] for c in candidates) == 1
    chosen = next(c for c in candidates if c["chosen"])
    assert chosen["score"] == max(c["score"] for c in candidates)
    assert serving.read_metadata(paths[0])["seed"] == str(chosen["seed"])


def test_predictor_without_a_scorer_refuses_num_candidates(tiny_checkpoint, monkeypatch):
    predictor = _predictor(tiny_checkpoint, monkeypatch)
    assert predictor.generator.scorer is None
    with pytest.raises(InputError, match=r"`num_candidates` is 2"):
        predictor.run(**_run_defaults() | {"num_candidates": 2, "seed": 1})


def test_predictor_setup_fails_naming_a_damaged_scorer_file(weights_with_scorer, monkeypatch):
    weights = weights_with_scorer / SCORER_FOLDER / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ScorerError, match=rf"{weights} does not match its sha256"):
        _predictor(weights_with_scorer, monkeypatch)


def test_make_tiny_weights_adds_a_scorer_best_of_n_can_load(tmp_path):
    from jsd.manifest import verify_manifest

    weights = tmp_path / "weights"
    load_repo_module("scripts/make_tiny_weights.py").main([str(weights), "--scorer", "cloob"])
    verify_manifest(weights)
    scorer = serving.load_optional_scorer(weights, device="cpu")
    assert scorer.model_type == "cloob"
    assert scorer.tokenizer.vocab_size == len(serving.load_pipeline(weights, device="cpu").tokenizer)
    assert serving.load_optional_scorer(tmp_path / "elsewhere") is None


# ---- jsd generate ---------------------------------------------------------------------------------------------


def test_jsd_generate_num_candidates_saves_the_best_and_prints_every_candidate(
    weights_with_scorer, generator, tmp_path, capsys
):
    from jsd.cli import main

    out = tmp_path / "best.png"
    args = ["generate", FAST["prompt"], "--weights", str(weights_with_scorer), "--width", "128", "--height", "128"]
    main([*args, "--steps", "2", "--seed", "100", "--num_candidates", "3", "--device", "cpu", "-o", str(out)])
    printed = capsys.readouterr().out
    expected = generator.generate(GenerationRequest(**FAST, num_candidates=3, seed=100))
    chosen = next(c for c in expected.candidates if c.chosen)
    metadata = serving.read_metadata(out)
    assert metadata["num_candidates"] == "3" and metadata["seed"] == str(chosen.seed)
    for c in expected.candidates:
        fate = "chosen" if c.chosen else "not chosen"
        assert f"image 0 candidate seed {c.seed}: Japanese CLIP score {c.score:.2f}, {fate}" in printed


def test_jsd_generate_num_candidates_without_a_scorer_is_one_line(tiny_checkpoint, tmp_path, capsys):
    from jsd.cli import main

    args = ["generate", "猫", "--weights", str(tiny_checkpoint), "--num_candidates", "2", "-o", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--steps", "2", "--width", "128", "--height", "128", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("jsd: error: `num_candidates` is 2, but this model has no Japanese")
    assert len(err.strip().splitlines()) == 1
