"""Write the final global adapter: safetensors, in PEFT's LoRA format where the family reduces to LoRA.

PEFT keys are ``base_model.model.<parameter name>`` and our LoRA layers name their factors exactly as
PEFT does (``<module>.lora_A.weight``), so ``peft.PeftModel.from_pretrained(base, dir)`` loads the
result; the task head travels as a ``modules_to_save`` entry.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from fed.adapters import Adapter
from fed.models import loadable_name

PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def export_adapter(adapter: Adapter, out: Path, *, task: str, base_model: str) -> Path:
    """Save every adapter tensor (sent or frozen-shared) and the config that describes it.

    ``adapter_config.json`` names the base model by an identifier PEFT can load (hub id or absolute path);
    ``fedlora.json`` keeps the name the run was configured with as well.
    """
    out.mkdir(parents=True, exist_ok=True)
    loadable = loadable_name(base_model, task)
    tensors = adapter.state(adapter.names())
    spec = adapter.spec
    heads = sorted({name.rsplit(".", 1)[0] for g in adapter.groups if g.name == "head" for name in g.params})
    (out / "fedlora.json").write_text(json.dumps({
        "kind": spec.kind, "rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets),
        "task": task, "base_model": base_model, "base_model_name_or_path": loadable,
        "groups": [{"name": g.name, "trainable": g.trainable, "sent": g.sent, "aggregation": g.aggregation.value,
                    "params": list(g.params)} for g in adapter.groups],
    }, indent=2))
    if not adapter.peft_compatible:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter.safetensors"))
        return out
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": PEFT_TASK_TYPES[task], "r": spec.rank, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": list(spec.targets), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": heads or None,
        "base_model_name_or_path": loadable, "inference_mode": True,
    }, indent=2))
    return out
