"""Fine-tuning Japanese Stable Diffusion: the two-stage recipe (``scripts/train.py``) and LoRA (``train.py``).

* :mod:`jsd.training.config` — ``TrainConfig`` (diffusers' flag names) and which modules each stage trains;
* :mod:`jsd.training.data` — image folder + ``metadata.jsonl`` and WebDataset shards, as a resumable stream;
* :mod:`jsd.training.step` — the noise-prediction loss with caption dropout;
* :mod:`jsd.training.models` — loading, freezing per stage;
* :mod:`jsd.training.checkpointing` — atomic checkpoints, ``latest``, pruning;
* :mod:`jsd.training.adapters` — the LoRA mode's parts (``--lora_rank``): peft adapters, adapter-only
  checkpoints, the LoRA export (below the trainer: it calls them);
* :mod:`jsd.training.trainer` — the accelerate loop and the export to the served layout;
* :mod:`jsd.training.lora_run` — one LoRA training from a user's archive to a .tar (the Cog trainer,
  ``train.py``; above the trainer: it calls it);
* :mod:`jsd.training.archive` — a user's .zip/.tar unpacked safely, with captions, into an image folder;
* :mod:`jsd.training.clip_score` — the Japanese CLIP data filter (``--min_clip_score``) and validation images
  with their scores (``--validation_prompts``).
"""

from jsd.training.config import TRAINED_MODULES, TrainConfig, parse_config

__all__ = ["TRAINED_MODULES", "TrainConfig", "parse_config"]
