"""The experts: pulled from a Hub repo or a local folder, read, and checked before any weight moves.

- :mod:`.folder` reads one folder (configs, safetensors headers, LoRA adapters) without running
  anything it names, and checks experts can be merged;
- :mod:`.hub` makes every Hub call that pulls (resolve, download, the cache, remote headers);
- :mod:`.pull` puts the two together: ``pull_expert`` / ``pull_experts``, and ``pull_model_files`` for the
  models that are not experts (the base, reward and judge models).
"""

from swarm_merge.experts.folder import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, INDEX_FILE, SMALL_PATTERNS, AdapterInfo,
                                        Expert, TensorInfo, check_compatible, check_weights, human_bytes,
                                        index_adapter, index_folder, is_adapter_folder, is_adapter_listing,
                                        read_adapter_config, read_headers, read_json)
from swarm_merge.experts.pull import pull_expert, pull_experts, pull_model_files

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "INDEX_FILE", "SMALL_PATTERNS", "AdapterInfo", "Expert", "TensorInfo",
           "check_compatible", "check_weights", "human_bytes", "index_adapter", "index_folder", "is_adapter_folder",
           "is_adapter_listing", "read_adapter_config", "read_headers", "read_json", "pull_expert", "pull_experts", "pull_model_files"]
