"""Fine-tuning Japanese Stable Diffusion: the two-stage recipe (``scripts/train.py`` is the entry point).

* :mod:`jsd.training.config` — ``TrainConfig`` (diffusers' flag names) and which modules each stage trains;
* :mod:`jsd.training.data` — image folder + ``metadata.jsonl`` and WebDataset shards, as a resumable stream;
* :mod:`jsd.training.step` — the noise-prediction loss with caption dropout;
* :mod:`jsd.training.models` — loading, freezing per stage;
* :mod:`jsd.training.checkpointing` — atomic checkpoints, ``latest``, pruning;
* :mod:`jsd.training.trainer` — the accelerate loop and the export to the served layout.
"""

from jsd.training.config import TRAINED_MODULES, TrainConfig, parse_config

__all__ = ["TRAINED_MODULES", "TrainConfig", "parse_config"]
