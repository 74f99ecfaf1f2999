"""rinna's Japanese tokenizer, with the exact ids of the 2022 pipeline and none of transformers 5's traps.

The contract, held by this class alone: ``str.lower()``, sentencepiece encode (the model's
own ``nmt_nfkc`` normalizer runs inside), at most ``model_max_length - 1`` pieces, ``</s>``, then
``[PAD]`` up to ``model_max_length`` (77). There is no BOS token. Control tokens are only ever
added by this class: sentencepiece never matches a control symbol in raw text, so text that spells
``</s>`` or ``[PAD]`` stays text.

transformers 5's ``T5Tokenizer`` is not used on purpose: it is no longer sentencepiece-backed,
ignores ``do_lower_case``, adds 100 extra ids and reports ``model_max_length=1e30``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import sentencepiece as spm
import torch
from transformers import BatchEncoding

SPIECE_FILE = "spiece.model"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
NOTICE_FILE = "NOTICE.md"  # beside rinna's spiece.model in ../shared: its Apache-2.0 notice
DEFAULT_MAX_LENGTH = 77
_MAX_SANE_LENGTH = 100_000  # rinna-era configs sometimes say 1e30, meaning "no limit"


class JapaneseTokenizer:
    """Sentencepiece tokenizer callable like a transformers tokenizer.

    Args:
        vocab_file: path to the sentencepiece model (``spiece.model``).
        do_lower_case: apply ``str.lower()`` before sentencepiece (rinna's model has no upper case).
        model_max_length: ids per sequence, ``</s>`` and padding included.
        eos_token: piece appended to every sequence.
        pad_token: piece used for padding.
        unk_token: piece of unknown text.
    """

    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | Path,
        *,
        do_lower_case: bool = True,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        eos_token: str = "</s>",
        pad_token: str = "[PAD]",
        unk_token: str = "<unk>",
    ) -> None:
        self.vocab_file = str(vocab_file)
        self.sp_model = spm.SentencePieceProcessor(model_file=self.vocab_file)
        self.do_lower_case = do_lower_case
        self.model_max_length = int(model_max_length)
        self.eos_token, self.pad_token, self.unk_token = eos_token, pad_token, unk_token
        self.eos_token_id = self._special_id(eos_token, "eos_token")
        self.pad_token_id = self._special_id(pad_token, "pad_token")
        self.unk_token_id = self._special_id(unk_token, "unk_token")
        # diffusers' textual-inversion helpers look for these; this tokenizer adds no tokens.
        self.added_tokens_encoder: dict[str, int] = {}

    def _special_id(self, piece: str, name: str) -> int:
        token_id = self.sp_model.piece_to_id(piece)
        if token_id == self.sp_model.unk_id() and piece != self.sp_model.id_to_piece(token_id):
            raise ValueError(f"`{name}`={piece!r} is not a piece of the sentencepiece model {self.vocab_file}.")
        return token_id

    # ----------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, folder: str | Path, subfolder: str | None = None, **overrides) -> JapaneseTokenizer:
        """Load a diffusers-style ``tokenizer/`` folder holding ``spiece.model``.

        rinna's ``tokenizer_config.json`` (written for ``T5Tokenizer``) is read for ``do_lower_case``,
        ``model_max_length`` and the special-token strings; anything else in it is ignored.
        """
        folder = Path(folder) / subfolder if subfolder else Path(folder)
        vocab_file = folder / SPIECE_FILE
        if not vocab_file.is_file():
            raise FileNotFoundError(f"No {SPIECE_FILE} in tokenizer folder {folder}.")
        config = _read_json(folder / SPECIAL_TOKENS_FILE) | _read_json(folder / CONFIG_FILE)
        kwargs = {
            "do_lower_case": bool(config.get("do_lower_case", True)),
            "model_max_length": _sane_max_length(config.get("model_max_length")),
        }
        for name in ("eos_token", "pad_token", "unk_token"):
            if name in config:
                kwargs[name] = _token_content(config[name])
        return cls(vocab_file, **(kwargs | overrides))

    def save_pretrained(self, folder: str | Path, **_: object) -> tuple[str, ...]:
        """Write ``spiece.model``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / SPIECE_FILE
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        special = {"eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": self.unk_token}
        config = {
            "tokenizer_class": type(self).__name__,
            "do_lower_case": self.do_lower_case,
            "model_max_length": self.model_max_length,
            "extra_ids": 0,
            **special,
        }
        _write_json(folder / CONFIG_FILE, config)
        _write_json(folder / SPECIAL_TOKENS_FILE, special)
        return (str(folder / CONFIG_FILE), str(folder / SPECIAL_TOKENS_FILE), str(target))

    # ----------------------------------------------------------------- encoding
    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in range(self.vocab_size) if self.sp_model.is_control(i) or self.sp_model.is_unknown(i)]

    def normalize(self, text: str) -> str:
        """The text as sentencepiece sees it (before its own NFKC normalizer)."""
        if not isinstance(text, str):
            raise TypeError(f"Text to tokenize must be a str, got {type(text).__name__}: {text!r}.")
        return text.lower() if self.do_lower_case else text

    def encode_pieces(self, text: str) -> list[int]:
        """Sentencepiece ids of ``text``: no truncation, no ``</s>``, no padding."""
        return self.sp_model.encode(self.normalize(text))

    def tokenize(self, text: str) -> list[str]:
        """The pieces of ``text`` (no special tokens)."""
        return self.sp_model.encode(self.normalize(text), out_type=str)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.sp_model.piece_to_id(tokens)
        return [self.sp_model.piece_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.sp_model.id_to_piece(ids)
        return [self.sp_model.id_to_piece(int(i)) for i in ids]

    def build_ids(self, text: str, *, max_length: int | None = None, truncation: bool = True) -> list[int]:
        """Ids of one text with ``</s>`` appended, truncated to ``max_length`` in all; unpadded."""
        pieces = self.encode_pieces(text)
        if truncation:
            limit = self.model_max_length if max_length is None else max_length
            pieces = pieces[: max(limit - 1, 0)]
        return [*pieces, self.eos_token_id]

    def encode(
        self, text: str, *, max_length: int | None = None, truncation: bool = True, padding: bool | str = False
    ) -> list[int]:
        """Ids of one text, like transformers' ``encode``."""
        return self(text, max_length=max_length, truncation=truncation, padding=padding)["input_ids"]

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool | str = False,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        **_: object,
    ) -> BatchEncoding:
        """Tokenize one text or a batch, with transformers' ``padding``/``truncation`` semantics.

        ``padding="max_length"`` pads to ``max_length`` (default ``model_max_length``);
        ``padding=True``/``"longest"`` pads to the longest sequence of the batch.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        truncate = truncation not in (False, "do_not_truncate")
        if truncate and max_length is None:
            max_length = self.model_max_length
        rows = [self.build_ids(t, max_length=max_length, truncation=truncate) for t in texts]
        target = _padded_length(rows, padding, max_length or self.model_max_length)
        masks = [[1] * len(r) + [0] * (max(target - len(r), 0)) for r in rows]
        rows = [r + [self.pad_token_id] * max(target - len(r), 0) for r in rows]
        data: dict[str, object] = {"input_ids": rows[0] if single else rows}
        if return_attention_mask:
            data["attention_mask"] = masks[0] if single else masks
        if return_tensors is not None and single:
            data = {k: [v] for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    # ----------------------------------------------------------------- decoding
    def decode(self, ids: Sequence[int] | torch.Tensor | np.ndarray, skip_special_tokens: bool = False, **_) -> str:
        """Text of ``ids``; special tokens are written as their pieces unless skipped."""
        ids = _to_list(ids)
        out, run = [], []
        for i in ids:
            if self.sp_model.is_control(i):
                out.append(self.sp_model.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self.sp_model.id_to_piece(i))
            else:
                run.append(i)
        out.append(self.sp_model.decode(run))
        return "".join(out)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in _to_list(sequences)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"do_lower_case={self.do_lower_case}, vocab_file={self.vocab_file!r})"
        )


def _padded_length(rows: list[list[int]], padding: bool | str, max_length: int) -> int:
    if padding in (False, "do_not_pad", None):
        return 0
    if padding == "max_length":
        return max_length
    if padding in (True, "longest"):
        return max((len(r) for r in rows), default=0)
    raise ValueError(f"`padding`={padding!r} is not supported; use False, True, 'longest' or 'max_length'.")


def _to_list(ids):
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return ids.tolist()
    return [int(i) for i in ids] if ids and not isinstance(ids[0], (list, tuple)) else list(ids)


def _token_content(value) -> str:
    # special_tokens_map.json may hold {"content": "</s>", ...} instead of a plain string
    return value["content"] if isinstance(value, dict) else str(value)


def _sane_max_length(value) -> int:
    if value is None or not isinstance(value, (int, float)) or not 1 < value < _MAX_SANE_LENGTH:
        return DEFAULT_MAX_LENGTH
    return int(value)


def copy_notice(tokenizer_model: Path, folder: Path) -> None:
    """Copy the :data:`NOTICE_FILE` beside the sentencepiece ``tokenizer_model`` into ``folder``, if there is one.

    rinna's tokenizer is Apache-2.0: every copy of it that jsd writes (the toy checkpoint, the toy CLIP, a build's
    work folder) travels with its notice."""
    notice = Path(tokenizer_model).parent / NOTICE_FILE
    if notice.is_file():
        shutil.copyfile(notice, Path(folder) / NOTICE_FILE)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
