"""The tokenizer contract: rinna's ids, exactly, for every kind of text a user can type."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch

from jsd import JapaneseTokenizer
from jsd.tiny import TINY_VOCAB_SIZE, corpus_lines
from jsd.tokenizer_training import train_sentencepiece

EOS, PAD, LENGTH = 2, 3, 77
CONTROL_IDS = {1, 2, 3, 4, 5, 6}


@pytest.fixture(scope="module")
def tok(rinna_spiece) -> JapaneseTokenizer:
    return JapaneseTokenizer(rinna_spiece)


@pytest.fixture(scope="module")
def reference(rinna_spiece):
    """rinna's pipeline as a direct sentencepiece computation: lower, encode, 76 pieces, </s>, [PAD]."""
    sp = spm.SentencePieceProcessor(model_file=str(rinna_spiece))

    def ids(text: str) -> list[int]:
        pieces = [*sp.encode(text.lower())[: LENGTH - 1], EOS]
        return pieces + [PAD] * (LENGTH - len(pieces))

    return ids


def encode(tok: JapaneseTokenizer, texts: list[str]) -> list[list[int]]:
    out = tok(texts, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")
    return out.input_ids.tolist()


def test_blog_example_gives_rinnas_ids(tok):
    ids = encode(tok, ["サラリーマン 油絵"])[0]
    assert ids[:8] == [9, 24111, 9, 2073, 1623, 2, 3, 3]
    assert ids[5:] == [EOS] + [PAD] * 71
    assert len(ids) == LENGTH


def test_real_captions_match_direct_sentencepiece(tok, reference, captions):
    assert len(captions) == 500
    assert encode(tok, captions) == [reference(c) for c in captions]


@pytest.mark.parametrize(
    ("text", "same_as"),
    [
        ("ABC Tokyo", "abc tokyo"),  # rinna's vocabulary has no upper case: without lower() these are <unk>
        ("ＡＢＣ", "abc"),  # full-width Latin
        ("１２３", "123"),  # full-width digits
        ("ｻﾗﾘｰﾏﾝ", "サラリーマン"),  # half-width kana
    ],
)
def test_case_and_width_variants_tokenize_like_their_plain_form(tok, reference, text, same_as):
    assert encode(tok, [text]) == [reference(text)] == encode(tok, [same_as])
    assert 0 not in encode(tok, [text])[0]  # no <unk>


def test_upper_case_would_be_unknown_without_lowering(rinna_spiece):
    raw = JapaneseTokenizer(rinna_spiece, do_lower_case=False)
    assert 0 in raw.encode_pieces("ABC")  # what transformers 5's T5Tokenizer silently does


@pytest.mark.parametrize("text", ["", " ", "　\t\n "])
def test_empty_and_whitespace_give_eos_then_padding(tok, text):
    assert encode(tok, [text])[0] == [EOS] + [PAD] * 76


def test_emoji_follows_sentencepiece(tok, reference):
    text = "猫😺と犬🐕"
    assert encode(tok, [text]) == [reference(text)]
    assert 0 in encode(tok, [text])[0]  # rinna's model has no byte fallback: emoji are <unk>


@pytest.mark.parametrize("text", ["</s>", "[PAD]", "<s>", "[CLS] [SEP] [MASK]", "<unk>", "猫</s>[PAD]犬"])
def test_text_that_spells_a_control_token_never_injects_its_id(tok, reference, text):
    ids = encode(tok, [text])[0]
    body = ids[: ids.index(EOS)]
    assert not CONTROL_IDS & set(body)
    assert ids == reference(text)


def test_long_text_is_truncated_to_76_pieces_then_eos(tok, reference):
    text = "、".join(["富士山と桜の油絵"] * 40)
    ids = encode(tok, [text])[0]
    assert len(ids) == LENGTH and ids[-1] == EOS and PAD not in ids
    assert ids == reference(text)


def test_padding_modes_and_masks(tok):
    out = tok(["猫", "サラリーマン 油絵"], padding="longest", return_tensors="pt")
    assert out.input_ids.shape == (2, 6)
    assert out.input_ids[0].tolist() == [*tok.encode_pieces("猫"), EOS] + [PAD] * 3
    assert out.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    single = tok("猫")
    assert single.input_ids == [*tok.encode_pieces("猫"), EOS]
    assert isinstance(tok("猫", padding="max_length", return_tensors="np").input_ids, np.ndarray)
    untruncated = tok("猫" * 100, truncation=False).input_ids
    assert len(untruncated) > LENGTH
    with pytest.raises(ValueError, match="`padding`"):
        tok("猫", padding="everything")
    with pytest.raises(TypeError, match="must be a str"):
        tok([None])


def test_decode_round_trip(tok, captions):
    ids = torch.tensor(encode(tok, captions[:4]))
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    assert texts == [tok.sp_model.decode(tok.encode_pieces(c)) for c in captions[:4]]
    assert tok.decode(encode(tok, ["サラリーマン 油絵"])[0][:7]) == "サラリーマン 油絵</s>[PAD]"


def test_from_pretrained_reads_rinnas_2022_tokenizer_folder(tmp_path, rinna_spiece, tok):
    (tmp_path / "spiece.model").write_bytes(rinna_spiece.read_bytes())
    config = {
        "tokenizer_class": "T5Tokenizer",
        "do_lower_case": True,
        "model_max_length": 77,
        "extra_ids": 0,
        "pad_token": "[PAD]",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "additional_special_tokens": [],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": {"content": "[PAD]", "lstrip": False}, "eos_token": "</s>"})
    )
    loaded = JapaneseTokenizer.from_pretrained(tmp_path)
    assert (loaded.model_max_length, loaded.pad_token_id, loaded.eos_token_id, len(loaded)) == (77, 3, 2, 32000)
    assert encode(loaded, ["ＡＢＣ 油絵"]) == encode(tok, ["ＡＢＣ 油絵"])


def test_from_pretrained_ignores_a_meaningless_max_length(tmp_path, rinna_spiece):
    (tmp_path / "spiece.model").write_bytes(rinna_spiece.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1e30}))
    assert JapaneseTokenizer.from_pretrained(tmp_path).model_max_length == 77  # not 1e30 (diffusers overflows)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"spiece\.model"):
        JapaneseTokenizer.from_pretrained(tmp_path)


def test_save_pretrained_round_trip(tmp_path, tok, captions):
    tok.save_pretrained(tmp_path / "tokenizer")
    again = JapaneseTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")
    assert encode(again, captions[:20]) == encode(tok, captions[:20])
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())["do_lower_case"] is True


def test_project_tokenizer_is_reproducible_and_keeps_rinnas_layout(tmp_path):
    first = train_sentencepiece(corpus_lines(), tmp_path / "a", vocab_size=TINY_VOCAB_SIZE)
    train_sentencepiece(corpus_lines(), tmp_path / "b", vocab_size=TINY_VOCAB_SIZE)
    assert (tmp_path / "a" / "spiece.model").read_bytes() == (tmp_path / "b" / "spiece.model").read_bytes()
    assert first.convert_ids_to_tokens(list(range(7))) == ["<unk>", "<s>", "</s>", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    ids = encode(first, ["サラリーマン 油絵", "</s>"])
    assert ids[0][-1] == PAD and EOS in ids[0] and not CONTROL_IDS & set(ids[1][: ids[1].index(EOS)])
