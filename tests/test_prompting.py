"""The Japanese prompt front end with rinna's real tokenizer: weights, chunks of 77, token reports."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import jsd
from jsd import (
    JapaneseStableDiffusionImg2ImgPipeline,
    JapaneseStableDiffusionInpaintPipeline,
    JapaneseStableDiffusionPipeline,
    prompting,
)
from jsd.cli import main
from jsd.prompting import parse_prompt_weights, tokenize_prompt
from jsd.tokenizer import JapaneseTokenizer

CLAUSES = ["青い空の下で遊ぶ子供たち", "古い木造の家", "赤い車が走る道", "夕焼けの海辺"]
LONG = "、".join(CLAUSES * 9)  # 189 pieces: three chunks of at most 76


@pytest.fixture(scope="module")
def tok(rinna_spiece) -> JapaneseTokenizer:
    return JapaneseTokenizer(rinna_spiece)


@pytest.fixture(scope="module")
def pipe(rinna_checkpoint) -> JapaneseStableDiffusionPipeline:
    return JapaneseStableDiffusionPipeline.from_pretrained(rinna_checkpoint, use_safetensors=True)


def reference_ids(tok: JapaneseTokenizer, texts: list[str]) -> torch.Tensor:
    """The single-sequence path: rinna's ids through the tokenizer, truncated to 77."""
    return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def reference_embeds(pipe, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return pipe.text_encoder(reference_ids(pipe.tokenizer, texts))[0]


def encode(pipe, texts: list[str], *, weighting: bool = False, max_chunks: int = 3, num_chunks: int | None = None):
    reports = [
        tokenize_prompt(pipe.tokenizer, t, prompt_weighting=weighting, max_prompt_chunks=max_chunks) for t in texts
    ]
    num_chunks = num_chunks or max(r.num_chunks for r in reports)
    with torch.no_grad():
        return prompting.encode_reports(pipe.tokenizer, pipe.text_encoder, reports, num_chunks=num_chunks, device="cpu")


# ------------------------------------------------------------------------------------------- weight syntax
@pytest.mark.parametrize(
    ("prompt", "runs"),
    [
        ("サラリーマン (油絵:1.3)", [("サラリーマン ", 1.0), ("油絵", 1.3)]),
        ("（猫：1.3）と犬", [("猫", 1.3), ("と犬", 1.0)]),
        ("（テキスト：１．３）", [("テキスト", 1.3)]),
        ("(猫：０.５)(犬:２)", [("猫", 0.5), ("犬", 2.0)]),
        ("(猫 : .5 )", [("猫 ", 0.5)]),
        ("((猫:2) 犬:1.5)", [("猫", 3.0), (" 犬", 1.5)]),  # nested weights multiply
        ("(猫（白）:1.2)", [("猫（白）", 1.2)]),  # unweighted brackets inside a weighted group stay text
        ("猫（かわいい）", [("猫（かわいい）", 1.0)]),
        ("犬(柴犬)と猫", [("犬(柴犬)と猫", 1.0)]),
        ("(猫", [("(猫", 1.0)]),
        ("猫)）", [("猫)）", 1.0)]),
        ("(猫:abc)", [("(猫:abc)", 1.0)]),
        (r"\(猫:1.5\)", [("(猫:1.5)", 1.0)]),
        (r"\（猫：1.5\）", [("（猫：1.5）", 1.0)]),
        ("a\\\\(b:2)", [("a\\", 1.0), ("b", 2.0)]),
        (r"C:\path\n", [(r"C:\path\n", 1.0)]),  # other backslashes are text
        ("", []),
    ],
)
def test_parse_prompt_weights(prompt, runs):
    assert parse_prompt_weights(prompt) == runs


def test_weights_land_on_the_pieces_of_their_span_even_where_lower_casing_changes_length(tok):
    # "İ".lower() is two characters; "ＡＢＣ" lower-cases to full-width letters sentencepiece folds to "abc"
    report = tokenize_prompt(tok, "İ (ＡＢＣ:1.5)、（猫：０．５）犬", prompt_weighting=True)
    assert report.text == "İ ＡＢＣ、猫犬"
    assert list(report.ids) == tok.encode_pieces(report.text)
    weights = dict(zip(report.pieces, report.weights, strict=True))
    assert weights["abc"] == 1.5 and weights["猫"] == 0.5
    assert weights["犬"] == weights["、"] == weights["▁i"] == 1.0


def test_without_weighting_the_syntax_is_plain_text(tok):
    report = tokenize_prompt(tok, "(猫:1.5)", prompt_weighting=False)
    assert report.text == "(猫:1.5)" and set(report.weights) == {1.0}
    assert list(report.ids) == tok.encode_pieces("(猫:1.5)")


def test_ids_equal_the_tokenizer_on_real_captions(tok, captions):
    for caption in captions[:200]:
        report = tokenize_prompt(tok, caption, prompt_weighting=True, max_prompt_chunks=1)
        if report.text == caption:
            ids = report.chunk_ids(0, eos_token_id=2, pad_token_id=3)
            assert ids == reference_ids(tok, [caption])[0].tolist(), caption


# ------------------------------------------------------------------------------------------- chunks
def test_long_prompt_is_cut_into_chunks_of_76_pieces_at_punctuation(tok):
    report = tokenize_prompt(tok, LONG)
    assert report.count == len(tok.encode_pieces(LONG)) > 2 * 76
    assert report.num_chunks == 3 and not report.truncated
    chunks = report.chunks
    assert all(0 < len(c) <= 76 for c in chunks)
    assert [p for c in chunks for p in c] == list(report.pieces)  # nothing lost, nothing repeated
    assert chunks[0][-1] == "、" and chunks[1][-1] == "、"  # cut after punctuation, not mid-phrase
    ids = report.chunk_ids(1, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert len(ids) == 77 and ids[len(chunks[1])] == tok.eos_token_id and ids[-1] == tok.pad_token_id


def test_overflow_is_reported_and_logged_never_silently_dropped(tok, caplog):
    report = tokenize_prompt(tok, LONG + "、最後の言葉", max_prompt_chunks=2)
    assert report.num_chunks == 2 and report.kept == sum(len(c) for c in report.chunks)
    assert report.truncated == list(report.pieces[report.kept :]) and report.truncated_text.endswith("最後の言葉")
    assert report.metrics() == {
        "prompt_tokens": report.count,
        "prompt_chunks": 2,
        "prompt_truncated_tokens": report.count - report.kept,
        "prompt_truncated_text": report.truncated_text,
    }
    assert "最後の言葉" in str(report) and f"truncated ({report.count - report.kept} pieces)" in str(report)
    with caplog.at_level(logging.WARNING, logger="jsd.prompting"):
        prompting.warn_truncated(report)
    assert "最後の言葉" in caplog.text and "max_prompt_chunks" in caplog.text


def test_one_chunk_truncates_exactly_like_the_single_sequence_path(tok):
    report = tokenize_prompt(tok, LONG, max_prompt_chunks=1)
    assert report.chunk_ids(0, eos_token_id=2, pad_token_id=3) == reference_ids(tok, [LONG])[0].tolist()
    assert len(report.truncated) == report.count - 76


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_max_prompt_chunks_is_refused(tok, bad):
    with pytest.raises(ValueError, match="max_prompt_chunks"):
        tokenize_prompt(tok, "猫", max_prompt_chunks=bad)


# ------------------------------------------------------------------------------------------- embeddings
def test_short_prompts_give_exactly_the_single_sequence_embeddings(pipe, captions):
    texts = [*captions[:6], "", "サラリーマン 油絵"]
    assert torch.equal(encode(pipe, texts, weighting=True), reference_embeds(pipe, texts))
    embeds, negative = pipe.encode_prompt(texts, "cpu", 1, True, ["低品質"] * len(texts), prompt_weighting=True)
    assert torch.equal(embeds, reference_embeds(pipe, texts))
    assert torch.equal(negative, reference_embeds(pipe, ["低品質"] * len(texts)))


def test_encode_texts_keeps_rinnas_single_sequence_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="jsd.prompting"), torch.no_grad():
        embeds = prompting.encode_texts(pipe.tokenizer, pipe.text_encoder, [LONG, "猫"], device="cpu")
    assert torch.equal(embeds, reference_embeds(pipe, [LONG, "猫"]))
    assert "was dropped" in caplog.text


def test_weight_one_equals_unweighted_text(pipe):
    weighted = encode(pipe, ["(猫:1.0)と（犬：１）、" + LONG], weighting=True)
    plain = encode(pipe, ["猫と犬、" + LONG])
    assert weighted.shape == plain.shape == (1, 3 * 77, pipe.text_encoder.config.hidden_size)
    assert torch.equal(weighted, plain)


def test_weights_scale_only_their_pieces(pipe):
    prompt = "サラリーマン (油絵:1.5) 青い空"
    report = tokenize_prompt(pipe.tokenizer, prompt, prompt_weighting=True)
    heavy = [i for i, w in enumerate(report.weights) if w != 1.0]
    assert [report.pieces[i] for i in heavy] == ["油", "絵"]
    weighted, plain = encode(pipe, [prompt], weighting=True)[0], encode(pipe, ["サラリーマン 油絵 青い空"])[0]
    scale = (weighted[-1] / plain[-1]).mean()  # padding is unweighted: only the mean rescale may move it
    for i in range(77):
        factor = scale * (1.5 if i in heavy else 1.0)
        torch.testing.assert_close(weighted[i], plain[i] * factor, rtol=1e-5, atol=1e-6)


def test_apply_weights_restores_each_chunk_mean_and_skips_an_undefined_one():
    hidden = torch.randn(3, 77, 16, generator=torch.Generator().manual_seed(0))
    hidden[0] += 0.5  # a chunk with a clear mean
    hidden[1] -= hidden[1].mean(dim=-1, keepdim=True)  # zero mean per token, like a bare LayerNorm
    weights = torch.ones(3, 77)
    weights[:2, 5:8] = 2.0
    out = prompting.apply_weights(hidden, weights)
    torch.testing.assert_close(out[0].mean(), hidden[0].mean())
    ratio = out[0, 0] / hidden[0, 0]
    assert not torch.allclose(ratio, torch.ones(16))
    torch.testing.assert_close(out[0, 5], hidden[0, 5] * 2 * ratio)
    torch.testing.assert_close(out[1, 5], hidden[1, 5] * 2)  # mean ≈ 0: multiplied, not blown up
    assert torch.equal(out[1, 0], hidden[1, 0]) and torch.equal(out[2], hidden[2])
    half = prompting.apply_weights(hidden.half(), weights)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_long_chunks_are_encoded_separately_and_concatenated(pipe):
    report = tokenize_prompt(pipe.tokenizer, LONG)
    embeds = encode(pipe, [LONG])[0]
    for k in range(report.num_chunks):
        ids = report.chunk_ids(k, eos_token_id=pipe.tokenizer.eos_token_id, pad_token_id=pipe.tokenizer.pad_token_id)
        with torch.no_grad():
            alone = pipe.text_encoder(torch.tensor([ids]))[0][0]
        torch.testing.assert_close(embeds[77 * k : 77 * (k + 1)], alone)


def test_prompt_and_negative_are_padded_to_the_same_chunks_with_empty_text(pipe):
    empty = reference_embeds(pipe, [""])[0]
    embeds, negative = pipe.encode_prompt(LONG, "cpu", 2, True, "低品質")
    assert embeds.shape == negative.shape == (2, 3 * 77, pipe.text_encoder.config.hidden_size)
    assert torch.equal(negative[0, :77], reference_embeds(pipe, ["低品質"])[0])
    assert torch.equal(negative[1, 77:154], empty) and torch.equal(negative[0, 154:], empty)
    short, long_negative = pipe.encode_prompt("猫", "cpu", 1, True, LONG)
    assert short.shape[1] == long_negative.shape[1] == 3 * 77
    assert torch.equal(short[0, :77], reference_embeds(pipe, ["猫"])[0]) and torch.equal(short[0, 77:154], empty)


def test_given_prompt_embeds_are_padded_to_a_long_negative_prompt(pipe):
    given = reference_embeds(pipe, ["猫"])
    embeds, negative = pipe.encode_prompt(None, "cpu", 1, True, LONG, prompt_embeds=given)
    assert embeds.shape == negative.shape == (1, 3 * 77, given.shape[-1])
    assert torch.equal(embeds[:, :77], given) and torch.equal(embeds[0, 77:154], reference_embeds(pipe, [""])[0])
    with pytest.raises(ValueError, match="`prompt_embeds` has shape"):
        pipe.encode_prompt(None, "cpu", 1, True, "犬", prompt_embeds=given[:, :70])


# ------------------------------------------------------------------------------------------- pipelines
def run(pipeline, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "output_type": "np", "generator": torch.Generator().manual_seed(0)} | kwargs
    return pipeline(**kwargs).images


def test_pipeline_generates_from_a_long_weighted_prompt_with_the_chunked_embeddings(pipe):
    prompt, negative = "(夕焼け:1.4)の" + LONG, "（低品質：１．２）"
    ours = run(pipe, prompt=prompt, negative_prompt=negative, height=64, width=64, prompt_weighting=True)
    embeds, negative_embeds = pipe.encode_prompt(prompt, "cpu", 1, True, negative, prompt_weighting=True)
    assert embeds.shape[1] == 3 * 77
    theirs = run(
        StableDiffusionPipeline(**pipe.components),
        prompt_embeds=embeds,
        negative_prompt_embeds=negative_embeds,
        height=64,
        width=64,
    )
    assert ours.shape == (1, 64, 64, 3) and np.isfinite(ours).all()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    unweighted = run(pipe, prompt=prompt, negative_prompt=negative, height=64, width=64)
    assert np.abs(ours - unweighted).max() > 1e-4  # the weights reach the image
    assert pipe._prompt_options == (False, prompting.DEFAULT_MAX_PROMPT_CHUNKS)  # options do not leak


@pytest.mark.parametrize("cls", [JapaneseStableDiffusionImg2ImgPipeline, JapaneseStableDiffusionInpaintPipeline])
def test_img2img_and_inpaint_take_the_prompt_options(pipe, cls):
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 40, 40))
    extra = {"mask_image": Image.new("L", (64, 64), 255)} if cls is JapaneseStableDiffusionInpaintPipeline else {}
    if extra:
        extra |= {"height": 64, "width": 64}
    out = run(cls(**pipe.components), prompt=LONG + "(猫:1.3)", image=image, prompt_weighting=True, **extra)
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"prompt_weighting": "yes"}, TypeError, "`prompt_weighting` must be True or False, got 'yes'"),
        ({"max_prompt_chunks": 0}, ValueError, "`max_prompt_chunks` must be an integer >= 1"),
    ],
)
def test_bad_prompt_options_are_refused_before_any_work(pipe, options, error, match):
    with pytest.raises(error, match=match):
        pipe(prompt="猫", num_inference_steps=1000, height=64, width=64, **options)


@pytest.mark.gpu
def test_long_weighted_prompt_in_fp16_on_cuda_matches_cpu(pipe, rinna_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cuda = JapaneseStableDiffusionPipeline.from_pretrained(
        rinna_checkpoint, use_safetensors=True, torch_dtype=torch.float16
    ).to("cuda")
    prompt, negative = "(夕焼け:1.4)の" + LONG, "（低品質：１．２）"
    expected = pipe.encode_prompt(prompt, "cpu", 1, True, negative, prompt_weighting=True)
    got = cuda.encode_prompt(prompt, "cuda", 1, True, negative, prompt_weighting=True)
    for ours, reference in zip(got, expected, strict=True):
        assert ours.dtype == torch.float16 and ours.device.type == "cuda" and ours.shape == reference.shape
        torch.testing.assert_close(ours.float().cpu(), reference, atol=2e-2, rtol=2e-2)
    image = run(cuda, prompt=prompt, negative_prompt=negative, height=64, width=64, prompt_weighting=True)
    assert np.isfinite(image).all()


# ------------------------------------------------------------------------------------------- report and CLI
def test_tokenize_report_loads_the_tokenizer_from_a_checkpoint_a_folder_or_a_file(
    rinna_checkpoint, rinna_spiece, monkeypatch
):
    monkeypatch.setenv("JSD_WEIGHTS", str(rinna_checkpoint))  # the default: $JSD_WEIGHTS/tokenizer
    reports = [
        jsd.tokenize_report("サラリーマン (油絵:1.3)", source, prompt_weighting=True)
        for source in (rinna_checkpoint, rinna_checkpoint / "tokenizer", rinna_spiece, None)
    ]
    assert reports[0] == reports[1] == reports[2] == reports[3]
    assert reports[0].pieces == ("▁", "サラリーマン", "▁", "油", "絵") and reports[0].weights[-1] == 1.3


def test_cli_tokenize_prints_pieces_chunks_and_truncation(rinna_checkpoint, capsys):
    main(["tokenize", LONG + "、最後の言葉", "--weights", str(rinna_checkpoint), "--max_prompt_chunks", "2"])
    out = capsys.readouterr().out
    count = len(JapaneseTokenizer.from_pretrained(rinna_checkpoint / "tokenizer").encode_pieces(LONG + "、最後の言葉"))
    assert f"{count} pieces in 2 chunk(s)" in out
    assert "chunk 1 (" in out and "chunk 2 (" in out and "chunk 3" not in out
    assert "最後の言葉" in out.split("truncated")[-1]
    main(["tokenize", "(油絵:1.3)", "--weights", str(rinna_checkpoint), "--prompt_weighting"])
    assert "油×1.3 絵×1.3" in capsys.readouterr().out


def test_cli_tokenize_without_a_tokenizer_says_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JSD_WEIGHTS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenize", "猫"])
    assert exit_info.value.code == 2
    assert "--weights DIR" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- serving (Cog)
def test_serving_passes_prompt_weighting_and_returns_the_token_report(pipe):
    from jsd import serving

    generator = serving.ImageGenerator(pipe)
    request = serving.GenerationRequest(
        prompt=LONG + "、(最後の言葉:1.3)", width=128, height=128, num_inference_steps=2, seed=3, output_format="png"
    )
    weighted = generator.generate(request)  # on by default, as in Cog and the CLI
    plain = generator.generate(dataclasses.replace(request, prompt_weighting=False))
    report = weighted.token_report
    assert report.text.endswith("最後の言葉") and report.weights[-1] == 1.3
    assert weighted.token_report.metrics() == {
        "prompt_tokens": report.count,
        "prompt_chunks": 3,
        "prompt_truncated_tokens": 0,
        "prompt_truncated_text": "",
    }
    assert plain.token_report.text.endswith("(最後の言葉:1.3)")  # off: brackets are text
    assert weighted.images[0].metadata["prompt_weighting"] == "True"
    pixels = [np.asarray(r.images[0].image, dtype=np.int16) for r in (weighted, plain)]
    assert np.abs(pixels[0] - pixels[1]).max() > 0
    with pytest.raises(serving.InputError, match="`prompt_weighting` must be true or false, got 'yes'"):
        generator.generate(dataclasses.replace(request, prompt_weighting="yes"))
