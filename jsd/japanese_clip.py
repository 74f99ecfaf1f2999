"""rinna's Japanese CLIP and CLOOB as a scorer: features, and the CLIP score ``100 × max(cos, 0)``.

``rinna/japanese-clip-vit-b-16`` and ``rinna/japanese-cloob-vit-b-16`` (code: GitHub ``rinnakk/japanese-clip``,
Apache-2.0, not on PyPI) are two towers, read here with transformers' own classes:

- ``src/japanese_clip/clip/modeling_clip.py`` ``CLIPModel.__init__``: each tower is
  ``AutoModel.from_config(sub_config, add_pooling_layer=False)`` (a ``vit`` and a ``bert`` sub-config), plus
  bias-free ``visual_projection`` / ``text_projection`` and a ``logit_scale`` parameter;
  ``get_image_features`` / ``get_text_features`` take ``last_hidden_state[:, 0]`` through the projection.
- ``cloob/modeling_cloob.py`` ``CLOOBModel``: the same towers and projections; ``inv_tau`` and
  ``scale_hopfield`` are plain config numbers used only by the training loss (no ``logit_scale``). At
  inference the two models differ in nothing but their weights.
- ``tokenizer.py`` ``tokenize()``: rinna/japanese-roberta-base's tokenizer (lower-cased sentencepiece), called
  with ``add_special_tokens=False, max_length=76, padding="max_length", truncation=True`` — no ``</s>`` —
  then ``[CLS]`` put first, the mask extended by one, and ``position_ids`` ``0..76`` passed explicitly.
- ``auto_model.py`` ``_transform()``: ``Resize(224, BILINEAR)``, ``CenterCrop(224)``, then RGB, ``ToTensor``,
  ``Normalize`` with OpenAI CLIP's mean/std. :func:`preprocess` redoes it with PIL and torch (torchvision
  cannot be installed beside torch 2.13 here), following torchvision's PIL code path step by step.

The top-level ``config.json`` says ``"model_type": "clip"``; transformers' ``CLIPModel`` would read it as its
own CLIP and build the wrong towers, hence :class:`DualEncoder`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from jsd.tokenizer import JapaneseTokenizer

SCORER_FOLDER = "japanese_clip"  # subfolder of a weights folder (JSD_WEIGHTS) holding the scorer
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HUB_WEIGHTS_FILE = "pytorch_model.bin"  # what rinna's hub repos hold (auto_model.py MODEL_FILE)
TOKENIZER_SUBFOLDER = "tokenizer"
MODEL_TYPES = ("clip", "cloob")
SCORER_REPOS = ("rinna/japanese-clip-vit-b-16", "rinna/japanese-cloob-vit-b-16")
TOKENIZER_REPO = "rinna/japanese-roberta-base"  # tokenizer.py load_tokenizer()
MAX_LENGTH = 77
CLS_PIECE = "[CLS]"
# auto_model.py _transform(): OpenAI CLIP's normalisation.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# Keys of transformers 4.x persistent buffers found in rinna's checkpoint; today's towers rebuild them.
_BUFFER_SUFFIXES = ("position_ids", "token_type_ids")
_DOWNLOAD_HINT = ".venv/bin/python scripts/download_weights.py --scorer rinna/japanese-clip-vit-b-16"


def scorer_folder(weights: str | os.PathLike) -> Path:
    """Where a weights folder keeps its Japanese CLIP scorer: ``weights/japanese_clip``."""
    return Path(weights) / SCORER_FOLDER


class ScorerError(ValueError):
    """A missing or damaged scorer folder; the message names the path and what is wrong."""


# --------------------------------------------------------------------------- preprocessing and tokens
def preprocess(image: PIL.Image.Image, size: int = 224) -> torch.Tensor:
    """rinna's ``_transform(size)`` on one PIL image: a ``(3, size, size)`` float32 tensor.

    torchvision's PIL path (``transforms/functional.py`` ``resize``, ``center_crop``, ``to_tensor``,
    ``normalize``): the short side becomes ``size`` (long side ``int(size * long / short)``) with PIL's
    bilinear filter; the crop's top-left is ``int(round((side - size) / 2))``; RGB conversion comes after the
    crop, as in rinna's ``Compose``; then ``/255`` and ``(x - mean) / std``.
    """
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), PIL.Image.BILINEAR)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # torchvision: int(round(...))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    pixels = pixels.to(torch.float32).div(255)
    mean = torch.as_tensor(IMAGE_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(IMAGE_STD, dtype=torch.float32)[:, None, None]
    return pixels.sub_(mean).div_(std)


def tokenize(tokenizer: JapaneseTokenizer, texts: Sequence[str], max_length: int = MAX_LENGTH) -> dict:
    """rinna's ``tokenize()`` through our tokenizer: ``[CLS]`` + at most 76 pieces + ``[PAD]``…, no ``</s>``.

    Returns ``input_ids``, ``attention_mask`` and ``position_ids`` (``0..76``: rinna passes them explicitly,
    since RoBERTa-style position ids would start after the padding id), each ``(len(texts), max_length)``.
    """
    cls_id = tokenizer.convert_tokens_to_ids(CLS_PIECE)
    if cls_id == tokenizer.unk_token_id:
        raise ScorerError(f"The scorer's tokenizer {tokenizer.vocab_file} has no {CLS_PIECE} piece.")
    rows = [[cls_id, *tokenizer.encode_pieces(text)[: max_length - 1]] for text in texts]
    mask = [[1] * len(r) + [0] * (max_length - len(r)) for r in rows]
    ids = [r + [tokenizer.pad_token_id] * (max_length - len(r)) for r in rows]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long).reshape(len(rows), max_length),
        "attention_mask": torch.tensor(mask, dtype=torch.long).reshape(len(rows), max_length),
        "position_ids": torch.arange(max_length).expand(len(rows), max_length).clone(),
    }


# --------------------------------------------------------------------------- the model
class DualEncoder(nn.Module):
    """rinna's ``CLIPModel``/``CLOOBModel`` at inference, with the same state-dict keys.

    Args:
        config: the parsed top-level ``config.json`` (``model_type`` "clip" or "cloob", ``text_config``,
            ``vision_config``, ``projection_dim``).
    """

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.model_type = config["model_type"]
        self.text_config = _sub_config(config["text_config"])
        self.vision_config = _sub_config(config["vision_config"])
        self.text_model = AutoModel.from_config(self.text_config, add_pooling_layer=False)
        self.vision_model = AutoModel.from_config(self.vision_config, add_pooling_layer=False)
        dim = int(config.get("projection_dim", 512))
        self.visual_projection = nn.Linear(self.vision_config.hidden_size, dim, bias=False)
        self.text_projection = nn.Linear(self.text_config.hidden_size, dim, bias=False)
        if self.model_type == "clip":  # CLOOB keeps inv_tau in its config, not as a parameter
            self.logit_scale = nn.Parameter(torch.tensor(float(config.get("logit_scale_init_value", 2.6592))))

    @property
    def image_size(self) -> int:
        return int(self.vision_config.image_size)

    def load_rinna_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict under rinna's keys (transformers 4.x tower names); strict, shapes checked."""
        renames = {tower: _renamer(getattr(self, tower)) for tower in _TOWERS}
        renamed = {}
        for key, tensor in state.items():
            tower, _, rest = key.partition(".")
            renamed[f"{tower}.{renames[tower](rest)}" if tower in renames else key] = tensor
        self.load_state_dict(renamed, strict=True)

    def rinna_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under rinna's keys, as transformers 4.x saved it (``revert_weight_conversion``)."""
        from transformers.core_model_loading import revert_weight_conversion

        state = {}
        for name, module in self.named_children():
            if name in _TOWERS:
                legacy = revert_weight_conversion(module, module.state_dict())
                state |= {f"{name}.{k}": v for k, v in legacy.items()}
            else:
                state |= {f"{name}.{k}": v for k, v in module.state_dict().items()}
        return state | {k: v for k, v in self.state_dict().items() if "." not in k}  # logit_scale

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features, as rinna's ``get_image_features``."""
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return self.visual_projection(hidden[:, 0, :])

    def get_text_features(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """Unnormalised text features, as rinna's ``get_text_features``."""
        hidden = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.text_projection(hidden[:, 0, :])


_TOWERS = ("text_model", "vision_model")


def _renamer(tower: nn.Module):
    """Maps a transformers 4.x key of ``tower`` to today's name, by transformers' own checkpoint conversion mapping.

    transformers 5 renamed ViT's ``encoder.layer.N.attention.attention.query`` to ``layers.N.attention.q_proj``
    (and more); ``from_pretrained`` renames old checkpoints with ``conversion_mapping.py``'s per-model_type
    ``WeightRenaming`` list, which is reused here because the towers are loaded from rinna's state dict by hand.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(tower)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return lambda key: rename_source_key(key, renamings, converters)[0]


def _sub_config(sub: dict):
    sub = dict(sub)
    model_type = sub.pop("model_type", None)
    if not model_type:
        raise KeyError("model_type")
    return AutoConfig.for_model(model_type, **sub)


def read_config(folder: Path) -> dict:
    """The scorer's ``config.json``, checked for what :class:`DualEncoder` needs; raises :class:`ScorerError`."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ScorerError(f"{path} is missing: {folder} is not a Japanese CLIP scorer folder ({_DOWNLOAD_HINT}).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScorerError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("model_type") not in MODEL_TYPES:
        found = config.get("model_type") if isinstance(config, dict) else config
        raise ScorerError(f"{path} has model_type {found!r}; a scorer is one of {', '.join(MODEL_TYPES)}.")
    for key in ("text_config", "vision_config"):
        if not isinstance(config.get(key), dict) or not config[key].get("model_type"):
            raise ScorerError(f"{path} lacks `{key}` (a dict with its own model_type, e.g. 'bert' or 'vit').")
    return config


def build_model(config: dict, state: dict[str, torch.Tensor], *, path: Path) -> DualEncoder:
    """A :class:`DualEncoder` holding ``state`` (rinna's keys); raises :class:`ScorerError` on any mismatch."""
    try:
        model = DualEncoder(config)
    except (KeyError, TypeError, ValueError) as err:
        raise ScorerError(f"{path.parent / CONFIG_FILE} does not describe the two towers: {err}") from err
    state = {k: v for k, v in state.items() if not k.endswith(_BUFFER_SUFFIXES)}
    expected = set(model.rinna_state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ScorerError(
            f"{path} does not fit {CONFIG_FILE}: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}."
        )
    try:
        model.load_rinna_state_dict(state)
    except RuntimeError as err:  # shape mismatches
        raise ScorerError(f"{path} does not fit {CONFIG_FILE}: {err}") from err
    return model.eval().requires_grad_(False)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a scorer's ``model.safetensors``; raises :class:`ScorerError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        hint = (
            f"it holds rinna's pickled {HUB_WEIGHTS_FILE}: convert it with "
            f"`.venv/bin/python scripts/download_weights.py --scorer {path.parent}`"
            if (path.parent / HUB_WEIGHTS_FILE).is_file()
            else _DOWNLOAD_HINT
        )
        raise ScorerError(f"{path} is missing ({hint}).")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ScorerError(f"{path} is not a readable safetensors file ({err}): damaged or truncated.") from err


# --------------------------------------------------------------------------- the scorer
class JapaneseCLIPScorer:
    """Image and text features of rinna's Japanese CLIP or CLOOB, and CLIP scores.

    Build it with :meth:`from_pretrained`; the model and tokenizer are passed in already built.
    """

    def __init__(
        self, model: DualEncoder, tokenizer: JapaneseTokenizer, *, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, device=None, dtype=None, verify: bool = True
    ) -> JapaneseCLIPScorer:
        """Load a scorer folder (``config.json``, ``model.safetensors``, ``tokenizer/``, ``manifest.json``).

        Args:
            device: default CUDA when available, else CPU.
            dtype: default float16 on CUDA, float32 elsewhere.
            verify: check the files against ``manifest.json`` first, when the folder has one.

        Raises :class:`ScorerError` naming the missing or damaged file.
        """
        from jsd.manifest import MANIFEST_FILE, WeightsVerificationError, verify_manifest

        folder = Path(folder)
        if not folder.is_dir():
            raise ScorerError(f"No Japanese CLIP scorer at {folder}: not a folder ({_DOWNLOAD_HINT}).")
        if verify and (folder / MANIFEST_FILE).is_file():
            try:
                verify_manifest(folder)
            except WeightsVerificationError as err:
                raise ScorerError(f"Japanese CLIP scorer {folder}: {err}") from err
        config = read_config(folder)
        model = build_model(config, load_weights(folder / WEIGHTS_FILE), path=folder / WEIGHTS_FILE)
        tokenizer = load_tokenizer(folder / TOKENIZER_SUBFOLDER)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        return cls(model.to(device=device, dtype=dtype), tokenizer, device=device, dtype=dtype)

    @property
    def model_type(self) -> str:
        """``"clip"`` or ``"cloob"``."""
        return self.model.model_type

    @torch.inference_mode()
    def image_features(self, images: Sequence[PIL.Image.Image], *, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image features, ``(N, D)`` float32 on CPU."""
        chunks = [
            self.model.get_image_features(self._pixels(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return _normalised(chunks, self.model.visual_projection.out_features)

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised text features, ``(N, D)`` float32 on CPU."""
        chunks = []
        for i in range(0, len(texts), batch_size):
            batch = tokenize(self.tokenizer, texts[i : i + batch_size])
            chunks.append(self.model.get_text_features(**{k: v.to(self.device) for k, v in batch.items()}))
        return _normalised(chunks, self.model.text_projection.out_features)

    def score(self, images: Sequence[PIL.Image.Image], texts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """CLIP score of the i-th image with the i-th text: ``100 × max(cos, 0)``, float32 on CPU, ``(N,)``.

        Each distinct text is encoded once (best-of-N scores many images against one prompt).
        """
        if len(images) != len(texts):
            raise ValueError(f"score() needs one text per image: got {len(images)} images and {len(texts)} texts.")
        position = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        text_features = self.text_features(list(position), batch_size=batch_size)
        index = torch.tensor([position[t] for t in texts], dtype=torch.long)
        image_features = self.image_features(images, batch_size=batch_size)
        cosine = (image_features * text_features[index]).sum(dim=-1)
        return 100 * cosine.clamp(min=0)

    def _pixels(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        size = self.model.image_size
        return torch.stack([preprocess(image, size) for image in images]).to(self.device, self.dtype)


def load_tokenizer(folder: Path) -> JapaneseTokenizer:
    """The scorer's tokenizer folder (rinna/japanese-roberta-base's ``spiece.model``); raises :class:`ScorerError`."""
    try:
        # rinna's load_tokenizer() sets do_lower_case = True whatever the config says ("bug of tokenizer config").
        return JapaneseTokenizer.from_pretrained(folder, do_lower_case=True)
    except (FileNotFoundError, OSError, RuntimeError, ValueError) as err:
        raise ScorerError(f"The scorer's tokenizer {folder} cannot be read: {err}") from err


def _normalised(chunks: list[torch.Tensor], dim: int) -> torch.Tensor:
    if not chunks:
        return torch.empty(0, dim)
    features = torch.cat(chunks).float()
    return (features / features.norm(dim=-1, keepdim=True)).cpu()
