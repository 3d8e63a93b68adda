"""LoRA as an adapter type, with DoRA, rsLoRA, `lora_bias` and embedding LoRA (PEFT_SPEC §1-§2, §5.2).

- `config.py`: parse and validate `adapter_config.json` into `LoraAdapterConfig`; LoRA's scaling.
- `type.py`: `LoraType`, the `AdapterType`: the keys each module claims, and building its weights.
- `weights.py`: `LoraWeights`, one adapter's A/B at one module, and the exact forward math.
- `merged.py`: a module's weights with one adapter merged in (fuse, export).
- `stacked.py`: `StackedLora`, many adapters' A/B on one module for the decode steps of a mixed batch.
- `factors.py`: `LoraFactors`, what `merged.py` and `stacked.py` read from a `LoraWeights`.
"""

from .config import LoraAdapterConfig, parse_lora_config, scaling
from .stacked import StackedLora
from .type import LoraType
from .weights import LoraWeights

__all__ = ["LoraAdapterConfig", "LoraType", "LoraWeights", "StackedLora", "parse_lora_config", "scaling"]
