"""Japanese prompt front end: text → ids → text-encoder embeddings, with rinna's exact ids."""

from __future__ import annotations

import logging

import torch

from jsd.tokenizer import JapaneseTokenizer

logger = logging.getLogger(__name__)


def encode_texts(
    tokenizer: JapaneseTokenizer,
    text_encoder: torch.nn.Module,
    texts: list[str],
    *,
    device: torch.device | str,
    clip_skip: int | None = None,
) -> torch.Tensor:
    """``last_hidden_state`` of ``texts``, shape ``(len(texts), 77, hidden)``."""
    ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    _warn_truncated(tokenizer, texts)
    return run_text_encoder(text_encoder, ids.to(device), clip_skip=clip_skip)


def run_text_encoder(text_encoder: torch.nn.Module, ids: torch.Tensor, *, clip_skip: int | None = None):
    """Hidden states used for cross-attention (diffusers' ``clip_skip`` semantics)."""
    if clip_skip is None:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return text_encoder.text_model.final_layer_norm(hidden)


def _warn_truncated(tokenizer: JapaneseTokenizer, texts: list[str]) -> None:
    keep = tokenizer.model_max_length - 1
    for text in texts:
        pieces = tokenizer.encode_pieces(text)
        if len(pieces) > keep:
            dropped = tokenizer.sp_model.decode(pieces[keep:])
            logger.warning("The prompt is longer than %d pieces; this part was dropped: %r", keep, dropped)
