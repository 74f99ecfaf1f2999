"""jsd — Japanese Stable Diffusion (rinna) on diffusers: tokenizer, pipelines, prompt front end.

The public names are imported on first use, so that ``import jsd.manifest`` or a CLI's ``--help``
does not pay for importing diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jsd.notices import drop_known_notices

__version__ = "0.1.0"
drop_known_notices()  # before transformers or diffusers are imported: some notices come at import time

_EXPORTS = {
    "JapaneseStableDiffusionPipeline": "jsd.pipelines",
    "JapaneseStableDiffusionImg2ImgPipeline": "jsd.pipelines",
    "JapaneseStableDiffusionInpaintPipeline": "jsd.pipelines",
    "JapaneseTokenizer": "jsd.tokenizer",
    "TokenReport": "jsd.prompting",
    "tokenize_report": "jsd.prompting",
}
__all__ = [
    "JapaneseStableDiffusionImg2ImgPipeline",
    "JapaneseStableDiffusionInpaintPipeline",
    "JapaneseStableDiffusionPipeline",
    "JapaneseTokenizer",
    "TokenReport",
    "tokenize_report",
]

if TYPE_CHECKING:
    from jsd.pipelines import (
        JapaneseStableDiffusionImg2ImgPipeline,
        JapaneseStableDiffusionInpaintPipeline,
        JapaneseStableDiffusionPipeline,
    )
    from jsd.prompting import TokenReport, tokenize_report
    from jsd.tokenizer import JapaneseTokenizer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jsd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
