"""``python -m jsd filter-data``: the pairs below the threshold dropped, exactly; cached, resumable, 2 processes.

Every test scores with a real tiny Japanese CLIP in its served layout (``jsd.tiny.write_tiny_scorer``); the
expected lists come from the scorer's image and text features, not from the filter's code.
"""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from processes import accelerate_launch, assert_every_process_closed_its_group, child_env
from repofiles import REPO

from jsd import cli, clip_filter
from jsd.cli import main
from jsd.drawing import ACCENT
from jsd.japanese_clip import SCORER_FOLDER, JapaneseCLIPScorer
from jsd.tiny import write_tiny_scorer

CAPTIONS = [
    "赤い花の写真",
    "海辺の夕日",
    "猫が寝ている",
    "富士山と雲",
    "東京の夜景",
    "桜の木",
    "雪の村",
    "青い車",
    "緑の森",
    "白い犬",
    "古い寺",
    "夏祭り",
]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def scorer_folder(tiny_scorer):
    return tiny_scorer


@pytest.fixture(scope="module")
def scorer(scorer_folder):
    return JapaneseCLIPScorer.from_pretrained(scorer_folder)


def image_bytes(seed: int) -> bytes:
    """Seeded images unlike each other (colour, noise), so that their scores spread."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    pixels = np.clip(base + rng.normal(0, 40 + 10 * seed, (64, 72, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_folder(root, *, captions=CAPTIONS, fmt: str = "metadata"):
    root.mkdir(parents=True)
    for i in range(len(captions)):
        (root / f"{i:02d}.png").write_bytes(image_bytes(i))
    if fmt == "metadata":
        lines = [
            json.dumps({"file_name": f"{i:02d}.png", "text": c}, ensure_ascii=False) for i, c in enumerate(captions)
        ]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "csv":
        rows = [f"{i:02d}.png,{c}" for i, c in enumerate(captions)]
        (root / "captions.csv").write_text("file_name,caption\n" + "\n".join(rows) + "\n", encoding="utf-8")
    else:
        for i, c in enumerate(captions):
            (root / f"{i:02d}.txt").write_text(c, encoding="utf-8")
    return root


def independent_scores(scorer, folder, captions=CAPTIONS) -> dict[str, float]:
    """100 × max(cos, 0) of each pair from the scorer's own features, one pair at a time."""
    scores = {}
    for i, caption in enumerate(captions):
        with Image.open(folder / f"{i:02d}.png") as image:
            features = scorer.image_features([image.convert("RGB")])
        text = scorer.text_features([caption])
        scores[f"{i:02d}.png"] = 100 * max(float((features * text).sum()), 0.0)
    return scores


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def between(scores: dict[str, float], k: int) -> float:
    """A threshold between the k-th and (k+1)-th lowest score: exactly k pairs fall below it."""
    ordered = sorted(scores.values())
    return (ordered[k - 1] + ordered[k]) / 2


class Counting:
    """The real scorer, counting the pairs it scores; ``fail_after``: raise as an interruption would."""

    def __init__(self, scorer, fail_after: int | None = None) -> None:
        self.scorer, self.fail_after, self.calls, self.scored = scorer, fail_after, 0, 0

    def score(self, images, texts, *, batch_size=32):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt  # Ctrl-C, or a killed batch: after the earlier batches were cached
        self.calls += 1
        self.scored += len(images)
        return self.scorer.score(images, texts, batch_size=batch_size)


# ------------------------------------------------------------------------------------------ the filter
def test_the_filter_drops_exactly_the_pairs_below_the_threshold(tmp_path, scorer, scorer_folder, capsys):
    data = data_folder(tmp_path / "data")
    expected = independent_scores(scorer, data)
    assert len({round(s, 3) for s in expected.values()}) == len(CAPTIONS)  # the scores spread: the test can fail
    threshold = between(expected, 5)
    out = tmp_path / "out"
    main(["filter-data", str(data), "--min_clip_score", f"{threshold!r}", "--scorer", str(scorer_folder),
          "--output_dir", str(out), "--batch_size", "5"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "7 kept, 5 dropped" in printed and "12 scored now, 0 from the cache" in printed

    kept, dropped = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "dropped.jsonl")
    assert {p["file_name"] for p in dropped} == {f for f, s in expected.items() if s < threshold}
    assert {p["file_name"] for p in kept} == {f for f, s in expected.items() if s >= threshold}
    for pair in kept + dropped:
        assert pair["clip_score"] == pytest.approx(expected[pair["file_name"]], abs=1e-3)
        assert pair["text"] == CAPTIONS[int(pair["file_name"][:2])]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert (report["kept"], report["dropped"], report["unscorable"], report["min_clip_score"]) == (7, 5, 0, threshold)
    assert [p["file_name"] for p in report["dropped_pairs"]] == [p["file_name"] for p in dropped]
    assert report["scores"]["mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-3)
    assert report["caption_source"] == "metadata.jsonl" and report["scorer"] == str(scorer_folder)


def test_a_score_equal_to_the_threshold_is_kept():
    listing = clip_filter.Listing("metadata.jsonl", [clip_filter.Pair("a.png", "a"), clip_filter.Pair("b.png", "b")])
    outcomes = [clip_filter.PairScore(0, 20.0), clip_filter.PairScore(1, 19.999)]
    result = clip_filter.split_by_threshold(listing, outcomes, 20.0)
    assert [p.file_name for p in result.kept] == ["a.png"] and [p.file_name for p in result.dropped] == ["b.png"]


def test_the_histogram_marks_the_threshold(tmp_path, scorer, scorer_folder):
    data = data_folder(tmp_path / "data")
    out = tmp_path / "out"
    main(
        ["filter-data", str(data), "--min_clip_score", "37.5", "--scorer", str(scorer_folder), "--output_dir", str(out)]
    )
    image = Image.open(out / "histogram.png").convert("RGB")
    assert image.size == (900, 420)
    # the plot spans x = 60 .. 880 for scores 0 .. 100: the red line stands at 60 + 820 × 0.375
    column = [image.getpixel((60 + round(820 * 0.375), y)) for y in range(60, 370)]
    assert sum(pixel == ACCENT for pixel in column) > 250
    assert not any(image.getpixel((60 + round(820 * 0.6), y)) == ACCENT for y in range(60, 370))
    bars = np.asarray(image)[40:370, 61:880]
    assert (bars == (70, 110, 170)).all(axis=-1).sum() > 0  # the bars are drawn


@pytest.mark.parametrize("fmt", ["metadata", "csv", "txt"])
def test_pairs_are_read_in_the_trainers_formats(tmp_path, fmt):
    data = data_folder(tmp_path / "data", fmt=fmt)
    listing = clip_filter.list_pairs(data)
    assert listing.caption_source == {"metadata": "metadata.jsonl", "csv": "captions.csv", "txt": "txt"}[fmt]
    assert [(p.file_name, p.text) for p in listing.pairs] == [(f"{i:02d}.png", c) for i, c in enumerate(CAPTIONS)]


def test_metadata_wins_and_pairs_without_captions_or_images_are_listed(tmp_path):
    data = data_folder(tmp_path / "data", fmt="csv")
    lines = [{"file_name": "00.png", "caption": "別"}, {"file_name": "gone.png", "caption": "無い"}]
    lines.append({"file_name": "01.png", "caption": "  "})
    text = "\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n{broken\n"
    (data / "metadata.jsonl").write_text(text, encoding="utf-8")
    listing = clip_filter.list_pairs(data, caption_column="caption")
    assert listing.caption_source == "metadata.jsonl"
    assert [(p.file_name, p.text) for p in listing.pairs] == [("00.png", "別")]
    assert listing.skipped["gone.png"] == "missing image file"
    assert listing.skipped["01.png"] == "empty caption"
    assert listing.skipped["02.png"] == "no caption (metadata.jsonl)"
    assert "caption" in listing.skipped["metadata.jsonl line 4"]


def test_an_unreadable_image_is_listed_as_unscorable_and_the_rest_are_scored(tmp_path, scorer, scorer_folder):
    data = data_folder(tmp_path / "data")
    (data / "03.png").write_bytes(b"\x89PNG not an image")
    result = clip_filter.filter_folder(
        data, scorer, 0.0, cache_dir=tmp_path / "cache", scorer_id=clip_filter.scorer_fingerprint(scorer_folder)
    )
    assert result.unscorable == {"03.png": "unreadable image (UnidentifiedImageError)"}
    assert len(result.kept) == len(CAPTIONS) - 1 and not result.dropped  # threshold 0 keeps every scored pair


# ------------------------------------------------------------------------------------------ the cache
def run_filter(data, scorer, tmp_path, scorer_folder, threshold, *, batch_size=4):
    return clip_filter.filter_folder(
        data,
        scorer,
        threshold,
        cache_dir=tmp_path / "cache",
        scorer_id=clip_filter.scorer_fingerprint(scorer_folder),
        batch_size=batch_size,
    )


def test_an_interrupted_run_keeps_its_scores_and_the_rerun_scores_only_the_rest(tmp_path, scorer, scorer_folder):
    data = data_folder(tmp_path / "data")
    threshold = between(independent_scores(scorer, data), 6)
    reference = run_filter(data, scorer, tmp_path / "reference", scorer_folder, threshold)

    interrupted = Counting(scorer, fail_after=2)  # two batches of 4 done, the third interrupted
    with pytest.raises(KeyboardInterrupt):
        run_filter(data, interrupted, tmp_path, scorer_folder, threshold)
    assert interrupted.scored == 8
    resumed = Counting(scorer)
    result = run_filter(data, resumed, tmp_path, scorer_folder, threshold)
    assert resumed.scored == 4 and (result.scored_now, result.from_cache) == (4, 8)
    assert (result.kept, result.dropped) == (reference.kept, reference.dropped)

    again = Counting(scorer)
    assert run_filter(data, again, tmp_path, scorer_folder, threshold).kept == reference.kept
    assert again.scored == 0  # everything cached


def test_a_line_cut_by_a_kill_is_ignored_and_the_next_batch_is_appended_cleanly(tmp_path, scorer, scorer_folder):
    data = data_folder(tmp_path / "data")
    run_filter(data, scorer, tmp_path, scorer_folder, 10.0)
    cache_file = tmp_path / "cache" / "scores-0.jsonl"
    full = cache_file.read_bytes()
    cache_file.write_bytes(full[: -len(full.splitlines()[-1]) // 2 - 1])  # the last line cut in half, no newline
    counting = Counting(scorer)
    result = run_filter(data, counting, tmp_path, scorer_folder, 10.0)
    assert counting.scored == 1 and result.from_cache == len(CAPTIONS) - 1  # only the cut pair again
    cache = clip_filter.ScoreCache(tmp_path / "cache", clip_filter.scorer_fingerprint(scorer_folder))
    assert len(cache.scores) == len(CAPTIONS) and cache.torn_lines == 1  # the new line did not join the torn one


def test_the_cache_is_keyed_by_caption_and_scorer(tmp_path, scorer, scorer_folder):
    data = data_folder(tmp_path / "data")
    run_filter(data, scorer, tmp_path, scorer_folder, 10.0)
    captions = [*CAPTIONS[:-1], "夏祭りの夜店"]
    lines = [json.dumps({"file_name": f"{i:02d}.png", "text": c}, ensure_ascii=False) for i, c in enumerate(captions)]
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    counting = Counting(scorer)
    run_filter(data, counting, tmp_path, scorer_folder, 10.0)
    assert counting.scored == 1  # the pair whose caption changed

    other_folder = write_tiny_scorer(tmp_path / "other" / SCORER_FOLDER, seed=1)
    other = Counting(JapaneseCLIPScorer.from_pretrained(other_folder))
    run_filter(data, other, tmp_path, other_folder, 10.0)
    assert other.scored == len(CAPTIONS)  # another scorer's scores are not reused


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--min_clip_score", "120"], "`--min_clip_score`=120 is outside 0-100"),
        (["--min_clip_score", "-1"], "`--min_clip_score`=-1 is outside 0-100"),
        (["--min_clip_score", "nan"], "`--min_clip_score` must be a number from 0 to 100, got nan"),
        (["--min_clip_score", "20", "--batch_size", "0"], "`--batch_size`=0 must be a positive integer"),
    ],
)
def test_bad_settings_are_one_line_naming_the_flag(tmp_path, scorer_folder, capsys, args, needle):
    data = data_folder(tmp_path / "data")
    with pytest.raises(SystemExit) as exc:
        main(["filter-data", str(data), "--scorer", str(scorer_folder), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_a_threshold_that_drops_every_pair_exits_non_zero_with_one_line(tmp_path, scorer, scorer_folder, capsys):
    data = data_folder(tmp_path / "data")
    highest = max(independent_scores(scorer, data).values())
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "filter-data",
                str(data),
                "--min_clip_score",
                "100",
                "--scorer",
                str(scorer_folder),
                "--output_dir",
                str(out),
            ]
        )
    captured = capsys.readouterr()
    assert exc.value.code == 2 and "0 kept, 12 dropped" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        f"jsd: error: `--min_clip_score` 100 drops every pair of {data} (highest score {highest:.2f}): lower it; "
        f"{out / 'histogram.png'} shows where the scores lie."
    )
    assert len(read_jsonl(out / "dropped.jsonl")) == 12  # the lists are written all the same


def test_ctrl_c_says_the_scores_are_kept_and_how_to_resume(tmp_path, scorer, scorer_folder, capsys, monkeypatch):
    data = data_folder(tmp_path / "data")
    monkeypatch.setattr(clip_filter, "load_scorer", lambda *a, **k: Counting(scorer, fail_after=1))
    out = tmp_path / "out"
    args = ["filter-data", str(data), "--min_clip_score", "20", "--output_dir", str(out), "--batch_size", "4"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--scorer", str(scorer_folder)])
    err = capsys.readouterr().err
    assert exc.value.code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"Interrupted: the scores computed so far are kept in {out / 'cache'}; run the same command again to "
        "resume (only the pairs not yet scored are scored)."
    )
    assert len((out / "cache" / "scores-0.jsonl").read_text(encoding="utf-8").splitlines()) == 4


def test_a_folder_without_captions_is_named(tmp_path, scorer_folder, capsys):
    data = tmp_path / "photos"
    data.mkdir()
    (data / "a.png").write_bytes(image_bytes(0))
    with pytest.raises(SystemExit):
        main(["filter-data", str(data), "--min_clip_score", "20", "--scorer", str(scorer_folder)])
    err = capsys.readouterr().err
    assert f"`data_dir` {data}: none of its 1 image(s) has a caption" in err and "metadata.jsonl" in err
    with pytest.raises(SystemExit):
        main(["filter-data", str(tmp_path / "nowhere"), "--min_clip_score", "20", "--scorer", str(scorer_folder)])
    assert "nowhere: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "photos-clip-filter").exists()


def test_a_missing_or_damaged_scorer_is_named_and_the_cache_survives(tmp_path, scorer, scorer_folder, capsys):
    data = data_folder(tmp_path / "data")
    weights = tmp_path / "weights"
    weights.mkdir()
    with pytest.raises(SystemExit):
        main(["filter-data", str(data), "--min_clip_score", "20", "--weights", str(weights)])
    assert (
        f"`--weights {weights}: its japanese_clip/` {weights / SCORER_FOLDER}: no Japanese CLIP"
        in capsys.readouterr().err
    )

    # the default location (WEIGHTS/japanese_clip) works; its scores are cached in the output folder
    (weights / SCORER_FOLDER).symlink_to(scorer_folder, target_is_directory=True)
    out = tmp_path / "out"
    main(["filter-data", str(data), "--min_clip_score", "20", "--weights", str(weights), "--output_dir", str(out)])
    cached = (out / "cache" / "scores-0.jsonl").read_bytes()
    assert "12 scored now" in capsys.readouterr().out

    damaged = tmp_path / "damaged"
    write_tiny_scorer(damaged)
    weights_file = next(damaged.glob("*.safetensors"))
    weights_file.write_bytes(weights_file.read_bytes()[:200])
    with pytest.raises(SystemExit):
        main(["filter-data", str(data), "--min_clip_score", "20", "--scorer", str(damaged), "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert f"`--scorer` {damaged}: the Japanese CLIP scorer cannot be loaded" in err, err
    assert (out / "cache" / "scores-0.jsonl").read_bytes() == cached  # nothing already scored is lost


# ------------------------------------------------------------------------------------------ processes
class RecordingState:
    """One process's accelerate state that records when the processes meet and when the group is closed."""

    process_index, num_processes, is_main_process, is_local_main_process, device = 0, 1, True, True, "cpu"

    def __init__(self):
        self.calls = []

    def wait_for_everyone(self):
        self.calls.append("meet")

    def destroy_process_group(self, group=None):
        self.calls.append("close")


def test_the_process_group_is_closed_after_the_work_and_after_an_error(tmp_path, scorer_folder, monkeypatch):
    # a group left open can abort a launched process at exit, failing a run whose lists are written
    data = data_folder(tmp_path / "data")
    state = RecordingState()
    monkeypatch.setattr(cli, "_process_state", lambda device: state)
    main(
        [
            "filter-data",
            str(data),
            "--min_clip_score",
            "20",
            "--scorer",
            str(scorer_folder),
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert state.calls == ["meet", "close"] and (tmp_path / "out" / "kept.jsonl").is_file()

    state.calls.clear()  # an error: no meeting (the others may never come), the group closed all the same

    def unloadable(folder, **kwargs):
        raise clip_filter.FilterError(f"`--scorer` {folder}: the Japanese CLIP scorer cannot be loaded")

    monkeypatch.setattr(clip_filter, "load_scorer", unloadable)
    with pytest.raises(SystemExit):
        main(["filter-data", str(data), "--min_clip_score", "20", "--scorer", str(scorer_folder)])
    assert state.calls == ["close"]


@pytest.mark.slow
def test_two_processes_give_the_lists_of_one(tmp_path, scorer_folder):
    data = data_folder(tmp_path / "data")
    common = ["filter-data", str(data), "--min_clip_score", "30", "--scorer", str(scorer_folder), "--batch_size", "3"]
    main([*common, "--output_dir", str(tmp_path / "one")])
    done = subprocess.run(
        accelerate_launch(*common, "--output_dir", str(tmp_path / "two")),
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert_every_process_closed_its_group(done.stderr)
    assert done.stdout.count("kept,") == 1  # one report, from the main process
    for name in ("kept.jsonl", "dropped.jsonl"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert one == two
    # each process cached its own share: 6 pairs each
    shares = [len(p.read_text().splitlines()) for p in sorted((tmp_path / "two" / "cache").glob("*.jsonl"))]
    assert shares == [6, 6]
    assert torch.tensor([p["clip_score"] for p in read_jsonl(tmp_path / "two" / "kept.jsonl")]).min() >= 30
