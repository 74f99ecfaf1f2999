"""Upstream log lines a user cannot act on, removed where they are logged (imported by ``jsd/__init__.py``).

Each filter sits on the one logger that emits the line and drops that line only, in the harmless case only:
nothing else of transformers' or diffusers' logging changes. These lines reached every server log and
Replicate's prediction page:

* transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`" (and the same for `SiglipImageProcessor`), once per process for each class;
* diffusers' "No LoRA keys associated to CLIPTextModel found …", three times per request with a LoRA
  for the UNet only;
* diffusers' "There are modules in … that should be kept in float32: []" when training casts a model;
* accelerate's "Saving current state to …" and "… state saved in …" for every file of a checkpoint;
* transformers' "Loading weights: 100%|…| 36/36" progress bars, two lines per model and server start
  (:func:`no_loading_bars`, around the loading of a local checkpoint only).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

# (logger, message pattern); the comment under each says why dropping it is harmless
KNOWN_NOTICES = [
    (
        "transformers.utils.import_utils",
        re.compile(r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`"),
        # transformers 5 (utils/import_utils.py, _LazyModule.__getattr__) names its PIL image processors
        # `…Pil`; the PIL one is what transformers 4 used. We install no torchvision on purpose (the CPU and
        # CUDA wheels are large), and the safety checker's CLIP preprocessing is the same with PIL.
    ),
    (
        "diffusers.loaders.lora_base",
        re.compile(r"^No LoRA keys associated to \w+ found with the prefix="),
        # diffusers (loaders/lora_base.py, _load_lora_into_text_encoder) warns whenever a LoRA has no
        # text-encoder keys, i.e. for every UNet-only LoRA. jsd.lora_weights.load_lora counts the LoRA matrices
        # that were loaded against those in the file itself and refuses a LoRA whose keys match no layer.
    ),
    (
        "diffusers.models.modeling_utils",
        re.compile(r"^There are modules in \w+ that should be kept in float32: \[\]\."),
        # diffusers (models/modeling_utils.py, ModelMixin.to) warns when `.to(dtype=…)` is called on a model
        # whose `_keep_in_fp32_modules` is set, even when that list is empty (`[]`): there is then nothing
        # to keep in float32. A non-empty list is still logged.
    ),
    (
        "accelerate.accelerator",
        re.compile(r"^(\[RANK \d+\] )?Saving current state to "),  # accelerate's MultiProcessAdapter adds the rank
        # accelerate's save_state announces each checkpoint folder; the trainer logs "Saved {folder}" once it
        # is complete (jsd.training.trainer), which is the line that matters.
    ),
    (
        "accelerate.checkpointing",
        re.compile(r"^(\[RANK \d+\] )?(Optimizer|Scheduler|Gradient scaler|Random) states? saved in "),
        # one line per file inside that checkpoint folder (optimizer.bin, scheduler.bin, random_states_0.pkl):
        # the trainer's "Saved {folder}" covers them.
    ),
]


class _DropNotice(logging.Filter):
    """Drops the records of one logger whose message matches ``pattern``."""

    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def drop_known_notices() -> None:
    """Install the filters (once; a second call changes nothing)."""
    for name, pattern in KNOWN_NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_DropNotice(pattern))


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """transformers' progress bars off for the block (they come back on after it, if they were on).

    transformers 5 draws a "Loading weights" bar for every model it loads (core_model_loading.py); loading a
    local checkpoint takes about a second, and on a server log the bar is two lines nobody can act on. The
    switch is transformers' own (``transformers.utils.logging.disable_progress_bar``; it also switches the
    hub's download bars, which a local load does not use).
    """
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()
