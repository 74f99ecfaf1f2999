"""``python -m jsd evaluate``: images as ``jsd generate`` makes them, scores, t intervals, --compare, 2 processes.

Tiny checkpoint with a tiny Japanese CLIP in its ``japanese_clip/`` (the served layout), 128², 2 steps.
The statistics are checked against scipy (an independent implementation), the images against ``jsd generate``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image
from processes import accelerate_launch, assert_every_process_closed_its_group, child_env
from repofiles import REPO

from jsd import evaluation
from jsd.cli import main
from jsd.japanese_clip import SCORER_FOLDER, JapaneseCLIPScorer

PROMPTS = ["赤い花の写真", "海辺の夕日、油絵", "猫が寝ている"]
FAST = ["--width", "128", "--height", "128", "--steps", "2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_checkpoint, tiny_scorer):
    """The tiny checkpoint with the tiny scorer where a real install has it: WEIGHTS/japanese_clip."""
    folder = tmp_path_factory.mktemp("evaluate") / "weights"
    shutil.copytree(tiny_checkpoint, folder)
    shutil.copytree(tiny_scorer, folder / SCORER_FOLDER)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# held out\n\n" + "\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_checkpoint):
    """A LoRA file that changes the image clearly."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from jsd.lora_weights import LORA_WEIGHT_NAME, UNET_TARGET_MODULES, save_lora

    folder = tmp_path_factory.mktemp("lora")
    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(UNET_TARGET_MODULES)))
    torch.manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    save_lora(folder, unet)
    return folder / LORA_WEIGHT_NAME


def evaluate(capsys, out, weights, prompts_file, *args: str) -> dict:
    main(
        ["evaluate", "--weights", str(weights), "--prompts", str(prompts_file), "--output_dir", str(out), *FAST, *args]
    )
    capsys.readouterr()
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def base_report(tmp_path_factory, weights, prompts_file):
    out = tmp_path_factory.mktemp("base") / "eval"
    main(["evaluate", "--weights", str(weights), "--prompts", str(prompts_file), "--output_dir", str(out), *FAST])
    return out, json.loads((out / "report.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("df", [1, 2, 4, 9, 49, 300])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.0125])
def test_t_quantile_equals_scipys(p, df):
    assert evaluation.t_quantile(p, df) == pytest.approx(scipy.stats.t.ppf(p, df), rel=1e-9, abs=1e-12)


def test_the_interval_is_scipys_t_interval_and_the_paired_one_scipys_ttest_rel():
    rng = np.random.default_rng(0)
    a, b = rng.normal(25, 4, 30), rng.normal(24, 4, 30)
    got = evaluation.t_interval(list(a))
    low, high = scipy.stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=scipy.stats.sem(a))
    assert (got.low, got.high, got.mean) == pytest.approx((low, high, a.mean()), rel=1e-10)
    assert got.method == "Student t" and got.n == 30 and got.confidence == 0.95
    rows = [[evaluation.Row(i, "p", i, float(x)) for i, x in enumerate(side)] for side in (a, b)]
    diff = evaluation.Evaluation(
        evaluation.EvalSettings(), [evaluation.ArmResult(k, r) for k, r in zip("ab", rows, strict=True)]
    )
    paired = scipy.stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (diff.difference.low, diff.difference.high) == pytest.approx((paired.low, paired.high), rel=1e-10)
    assert diff.difference.method == "paired Student t"
    assert evaluation.t_interval([3.0]).low is None  # one value: a mean, no interval


# ------------------------------------------------------------------------------------------ prompts
def test_the_shipped_prompts_are_50_distinct_japanese_prompts():
    prompts = evaluation.read_prompts()
    assert len(prompts) == len(set(prompts)) == 50
    assert all(any("\u3040" <= ch <= "\u9fff" for ch in p) for p in prompts)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "no such file"),
        (b"", "holds no prompt"),
        (b"# only a comment\n\n   \n", "holds no prompt"),
        ("猫の絵\n犬の絵".encode("shift_jis"), "is not UTF-8 text (byte 0x94 on line 1): save it as UTF-8"),
        ("猫\n" + "あ" * 2001, "prompt 2 ('ああ"),
    ],
)
def test_a_bad_prompt_file_is_one_line_naming_it(tmp_path, weights, capsys, content, needle):
    path = tmp_path / "mine.txt"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--weights", str(weights), "--prompts", str(path), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"`--prompts` {path}" in err and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--scorer", "{tmp}/none"], "`--scorer` {tmp}/none: no Japanese CLIP scorer there"),
        (["--compare", "{tmp}"], "`--compare` {tmp}: not a checkpoint folder"),
        (["--compare", "{tmp}/missing.safetensors"], "`--compare`"),
        (["--lora_scale", "3"], "`lora_scale` must be"),
        (["--width", "200"], "`width` must be a multiple of 64"),
        (["--font", "{tmp}/nofont.ttf"], "`--font` {tmp}/nofont.ttf: not a font file"),
    ],
)
def test_bad_flags_are_one_line_naming_them(tmp_path, weights, prompts_file, capsys, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--weights", str(weights), "--prompts", str(prompts_file),
              "--output_dir", str(tmp_path / "o"), *FAST, *args])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle.replace("{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "o").exists()


def test_weights_without_a_scorer_name_the_folder(tmp_path, tiny_checkpoint, prompts_file, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--weights", str(tiny_checkpoint), "--prompts", str(prompts_file)])
    assert f"`--weights {tiny_checkpoint}: its japanese_clip/`" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ one side
def test_each_image_is_jsd_generates_and_each_score_the_scorers(base_report, weights, tiny_scorer, tmp_path, capsys):
    out, report = base_report
    rows = report["arms"][0]["prompts"]
    assert [(r["index"], r["prompt"], r["seed"]) for r in rows] == [(i, p, i) for i, p in enumerate(PROMPTS)]
    scorer = JapaneseCLIPScorer.from_pretrained(tiny_scorer)
    for row in rows[:2]:
        image = Image.open(out / "images" / "A" / f"{row['index'] + 1:03d}.png").convert("RGB")
        assert image.size == (128, 128)
        main(["generate", row["prompt"], "--weights", str(weights), "--seed", str(row["seed"]), *FAST,
              "--disable_safety_checker", "-o", str(tmp_path / "g.png")])  # fmt: skip
        generated = Image.open(tmp_path / "g.png").convert("RGB")
        assert np.array_equal(np.asarray(image), np.asarray(generated))  # the prediction path, bit for bit
        features = scorer.image_features([image]) @ scorer.text_features([row["prompt"]]).T
        assert row["clip_score"] == pytest.approx(100 * max(features.item(), 0.0), abs=1e-3)
    scores = np.array([r["clip_score"] for r in rows])
    mean = report["arms"][0]["mean"]
    low, high = scipy.stats.t.interval(0.95, len(scores) - 1, loc=scores.mean(), scale=scipy.stats.sem(scores))
    assert (mean["mean"], mean["low"], mean["high"]) == pytest.approx((scores.mean(), low, high), rel=1e-6)
    assert "difference_a_minus_b" not in report
    table = (out / "report.md").read_text(encoding="utf-8")
    assert all(p in table for p in PROMPTS) and "95% CI" in table and "Student t" in table


def test_generation_settings_reach_every_image(tmp_path, weights, prompts_file, capsys):
    args = ["--seed", "40", "--guidance_scale", "3", "--scheduler", "DDIM", "--negative_prompt", "ぼやけた"]
    args += ["--width", "192", "--height", "128"]
    report = evaluate(capsys, tmp_path / "eval", weights, prompts_file, *args)
    assert report["settings"] == {
        "seed": 40, "num_inference_steps": 2, "guidance_scale": 3.0, "width": 192, "height": 128,
        "scheduler": "DDIM", "negative_prompt": "ぼやけた",
    }  # fmt: skip
    assert [r["seed"] for r in report["arms"][0]["prompts"]] == [40, 41, 42]
    image = Image.open(tmp_path / "eval" / "images" / "A" / "003.png").convert("RGB")
    assert image.size == (192, 128)
    main(["generate", PROMPTS[2], "--weights", str(weights), "--seed", "42", "--steps", "2", "--guidance_scale", "3",
          "--scheduler", "DDIM", "--negative_prompt", "ぼやけた", "--width", "192", "--height", "128",
          "--disable_safety_checker", "-o", str(tmp_path / "g.png")])  # fmt: skip
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "g.png").convert("RGB")))


def test_the_contact_sheet_numbers_the_prompts_without_a_japanese_font(base_report, monkeypatch, tmp_path, capsys):
    from jsd import drawing

    out, report = base_report
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width == 8 + 3 * (192 + 8)  # three cells in a row
    monkeypatch.setattr(drawing, "_fontconfig_japanese", lambda: [])
    monkeypatch.setattr(drawing, "JAPANESE_FONT_PATHS", ())
    font = drawing.japanese_font(14)
    assert not font.japanese
    rows = [evaluation.Row(**r) for r in report["arms"][0]["prompts"]]
    for row in rows:
        row.png = (out / "images" / "A" / f"{row.index + 1:03d}.png").read_bytes()
    result = evaluation.Evaluation(evaluation.EvalSettings(), [evaluation.ArmResult("A", rows)])
    bare = evaluation.write_report(result, tmp_path / "bare", font=font)
    assert "No Japanese font was found" in (tmp_path / "bare" / "report.md").read_text(encoding="utf-8")
    ipa = "/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf"
    if not drawing.Path(ipa).is_file():
        pytest.skip("IPA Gothic is not installed (apt-get install fonts-ipafont-gothic)")
    captioned = evaluation.write_report(result, tmp_path / "font", font=drawing.japanese_font(14, ipa))
    assert Image.open(captioned["sheet"]).height > Image.open(bare["sheet"]).height  # two caption lines per row


DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # Latin, Greek, Cyrillic: no Japanese


@pytest.mark.skipif(not Path(DEJAVU).is_file(), reason="DejaVu is not installed")
def test_a_font_without_japanese_glyphs_is_told_and_draws_no_boxes(weights, tmp_path, capsys):
    from jsd import drawing

    assert not drawing.japanese_font(14, DEJAVU).japanese
    prompts = tmp_path / "one.txt"
    prompts.write_text(PROMPTS[0] + "\n", encoding="utf-8")
    args = ["evaluate", "--weights", str(weights), "--prompts", str(prompts), "--output_dir", str(tmp_path / "e")]
    main([*args, *FAST, "--font", DEJAVU])
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "--font" in line]
    assert warning == [
        f"`--font` {DEJAVU} has no Japanese glyphs (it would draw boxes): the contact sheet numbers the prompts "
        "(see report.md); give a Japanese font, e.g. from fc-list :lang=ja."
    ]


def test_the_contact_sheet_says_which_side_is_a_and_which_b(base_report, tmp_path):
    from jsd import drawing

    out, report = base_report
    arms = []
    for side in "AB":
        rows = [evaluation.Row(**r) for r in report["arms"][0]["prompts"]]
        for row in rows:
            row.png = (out / "images" / "A" / f"{row.index + 1:03d}.png").read_bytes()
        arms.append(evaluation.ArmResult(f"side-{side}", rows))
    result = evaluation.Evaluation(evaluation.EvalSettings(), arms)
    assert evaluation.sheet_legend(result) == [
        "Each prompt: A on the left, B on the right (the difference reported is A - B)",
        "A = side-A",
        "B = side-B",
    ]
    real, seen = drawing.contact_sheet, {}

    def spy(cells, font, **kwargs):
        seen.update(kwargs)
        return real(cells, font, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(drawing, "contact_sheet", spy)
        evaluation.write_report(result, tmp_path / "ab")
    assert seen == {"legend": evaluation.sheet_legend(result), "image_labels": "AB"}
    font = drawing.Font(drawing.ImageFont.load_default(14), japanese=False)
    cells = [drawing.SheetCell([Image.new("RGB", (8, 8), "black")] * 2, "#1")]
    plain = np.asarray(drawing.contact_sheet(cells, font).convert("L"))
    marked = np.asarray(drawing.contact_sheet(cells, font, legend=["A = x"], image_labels="AB").convert("L"))
    assert marked.shape[0] > plain.shape[0] and (marked[: marked.shape[0] - plain.shape[0]] < 128).any()  # legend
    # a white tag in the top-left corner of each image, on the black thumbnails
    below = marked.shape[0] - plain.shape[0]
    for k in range(2):
        x = 8 + k * (192 + 4)
        assert (marked[below + 8 : below + 14, x : x + 6] > 128).any() and not (plain[8:14, x : x + 6] > 128).any()


# ------------------------------------------------------------------------------------------ two sides
def test_compare_gives_the_paired_difference_lora_against_base(
    base_report, weights, prompts_file, lora, tmp_path, capsys
):
    _, base = base_report
    report = evaluate(
        capsys, tmp_path / "eval", weights, prompts_file, "--lora_weights", str(lora), "--compare", str(weights)
    )
    a, b = report["arms"]
    assert "LoRA" in a["label"] and b["label"] == str(weights)
    assert b["prompts"] == base["arms"][0]["prompts"]  # B is the base model, same seeds: the same scores
    diffs = np.array([x["clip_score"] - y["clip_score"] for x, y in zip(a["prompts"], b["prompts"], strict=True)])
    assert np.abs(diffs).max() > 0.01  # the LoRA changed the images
    paired = scipy.stats.ttest_rel([x["clip_score"] for x in a["prompts"]], [y["clip_score"] for y in b["prompts"]])
    ci = paired.confidence_interval(0.95)
    difference = report["difference_a_minus_b"]
    assert (difference["mean"], difference["low"], difference["high"]) == pytest.approx((diffs.mean(), ci.low, ci.high))
    assert difference["verdict"]
    assert Image.open(tmp_path / "eval" / "contact_sheet.png").width == 8 + 3 * (2 * 192 + 4 + 8)  # A, B side by side


def test_compare_with_a_lora_at_scale_zero_is_the_base_exactly(
    base_report, weights, prompts_file, lora, tmp_path, capsys
):
    _, base = base_report
    report = evaluate(capsys, tmp_path / "eval", weights, prompts_file, "--compare", str(lora), "--lora_scale", "0")
    a, b = report["arms"]
    assert a["prompts"] == b["prompts"] == base["arms"][0]["prompts"]  # --lora_scale reaches B's images
    assert f"LoRA {lora} (scale 0)" in b["label"]
    difference = report["difference_a_minus_b"]
    assert (difference["mean"], difference["low"], difference["high"]) == (0.0, 0.0, 0.0)
    assert "no clear difference" in difference["verdict"]


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(base_report, weights, prompts_file, tmp_path):
    out, one = base_report
    args = ["evaluate", "--weights", str(weights), "--prompts", str(prompts_file), *FAST, "--device", "cpu"]
    done = subprocess.run(
        accelerate_launch(*args, "--output_dir", str(tmp_path / "two")),
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert_every_process_closed_its_group(done.stderr)
    two = json.loads((tmp_path / "two" / "report.json").read_text(encoding="utf-8"))
    assert two == one
    for index in range(1, len(PROMPTS) + 1):
        name = f"images/A/{index:03d}.png"
        assert (tmp_path / "two" / name).read_bytes() == (out / name).read_bytes(), name
    assert done.stdout.count("mean Japanese CLIP score") == 1  # one report, from the main process
