"""Hugging Face helpers of the library API (read-only on the checkpoint; see docs/hf.md).

``export(ckpt, out, ...)`` writes a ``from_pretrained``-ready folder from a Trainer run's
``output_dir``, a ``checkpoint-N`` folder or its ``global_stepN``; ``export_adapter(ckpt, out)``
writes the PEFT adapter folder of a LoRA run (``PeftModel.from_pretrained`` loads it);
``export_merged(ckpt, out, base)`` writes the base model with that adapter merged in.
"""

from __future__ import annotations

from dsckpt.api.hf import export, export_adapter, export_merged

__all__ = ["export", "export_adapter", "export_merged"]
