"""rcp-llava: visual-token pruning for Hugging Face LLaVA models.

Importing the package registers `rcp_llava` with the Auto classes (the same mapping a saved folder's
`config.auto_map` gives remote code: `AutoConfig`, `AutoModel` -> `RcpLlavaModel`, `AutoModelForCausalLM` and
`AutoModelForImageTextToText` -> `RcpLlavaForConditionalGeneration`), so an installed user can load a saved RCP
model with `AutoModelForImageTextToText.from_pretrained(folder)` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from configuration_rcp_llava import RcpLlavaConfig
from modeling_rcp_llava import (
    RCP_LLAVA_VERSION,
    RcpDynamicCache,
    RcpLlavaForConditionalGeneration,
    RcpLlavaModel,
    RcpPruner,
    RcpPruningInfo,
    RcpRepairAdapter,
    RcpRepairContext,
)


__version__ = RCP_LLAVA_VERSION  # one place: modeling_rcp_llava.py (written into plug-in checkpoints too)

AutoConfig.register("rcp_llava", RcpLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(RcpLlavaConfig, RcpLlavaForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(RcpLlavaConfig, RcpLlavaForConditionalGeneration, exist_ok=True)
AutoModel.register(RcpLlavaConfig, RcpLlavaModel, exist_ok=True)

__all__ = [
    "RcpLlavaConfig",
    "RcpLlavaForConditionalGeneration",
    "RcpLlavaModel",
    "RcpPruner",
    "RcpRepairAdapter",
    "RcpRepairContext",
    "RcpDynamicCache",
    "RcpPruningInfo",
]
