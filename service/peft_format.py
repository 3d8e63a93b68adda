"""Names fixed by PEFT's on-disk adapter format (PEFT_SPEC §1.1, §1.5)."""

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FILE_PREFIX = "base_model.model."  # every tensor key in the weights file starts with it
