"""jsd — Japanese Stable Diffusion (rinna) on diffusers: tokenizer, pipelines, loading."""

from jsd.pipelines import (
    JapaneseStableDiffusionImg2ImgPipeline,
    JapaneseStableDiffusionInpaintPipeline,
    JapaneseStableDiffusionPipeline,
)
from jsd.prompting import TokenReport, tokenize_report
from jsd.tokenizer import JapaneseTokenizer

__all__ = [
    "JapaneseStableDiffusionImg2ImgPipeline",
    "JapaneseStableDiffusionInpaintPipeline",
    "JapaneseStableDiffusionPipeline",
    "JapaneseTokenizer",
    "TokenReport",
    "tokenize_report",
]
__version__ = "0.1.0"
