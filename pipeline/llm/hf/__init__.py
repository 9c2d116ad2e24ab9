"""The HF transformers backend, one job per module:

* ``backend``: ``HFBackend``, batched generation (grouping, padding, OOM halving) and the model's options;
* ``loading``: weights, dtype, quantization and LoRA adapters, loaded once per process;
* ``decoding``: per-row stopping and seeded per-row sampling, so that a row's answer does not depend on its batch;
* ``prefix``: reuse of earlier prompts' key/value caches (an episode's next step is prefilled from where it
  differs);
* ``choices``: choice scoring (the log-probability judge).
"""

from pipeline.llm.hf.backend import HFBackend

__all__ = ["HFBackend"]
