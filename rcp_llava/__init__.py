"""rcp-llava: visual-token pruning for Hugging Face LLaVA models.

Importing the package registers `rcp_llava` with the Auto classes, so an installed user can load a saved
RCP model with `AutoModelForImageTextToText.from_pretrained(folder)` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForImageTextToText

from configuration_rcp_llava import RcpLlavaConfig
from modeling_rcp_llava import (
    RcpDynamicCache,
    RcpLlavaForConditionalGeneration,
    RcpLlavaModel,
    RcpPruner,
    RcpPruningInfo,
    RcpRepairAdapter,
)


__version__ = "0.1.0"

AutoConfig.register("rcp_llava", RcpLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(RcpLlavaConfig, RcpLlavaForConditionalGeneration, exist_ok=True)

__all__ = [
    "RcpLlavaConfig",
    "RcpLlavaForConditionalGeneration",
    "RcpLlavaModel",
    "RcpPruner",
    "RcpRepairAdapter",
    "RcpDynamicCache",
    "RcpPruningInfo",
]
