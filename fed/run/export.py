"""Write the final global adapter, and load it back: safetensors + ``fedlora.json`` for every family,
plus PEFT's LoRA format where the family reduces to LoRA.

``adapter.safetensors`` holds every adapter tensor under its own name (sent and frozen-shared, so the
file alone rebuilds the adapter) and ``fedlora.json`` the spec and tensor groups; ``load_adapter``
reads these two for any family, including those with no PEFT equivalent (MoLE, MoR). Families that
reduce to LoRA (LoRA, FFA-LoRA, MoSLoRA with its mixer folded into B), on a model whose head is the
model's own (``model.pooling = "cls"``) and whole (``model.layers = 0``), also get
``adapter_model.safetensors`` + ``adapter_config.json``: PEFT keys are ``base_model.model.<name>`` and
our LoRA layers name their factors as PEFT does, so ``peft.PeftModel.from_pretrained(base, dir)``
loads it; the task head travels as a ``modules_to_save`` entry. A mean-pooled head
(``fed.models.MeanPooledClassifier``) or a trunk cut to its first blocks has no PEFT equivalent (PEFT
would rebuild the whole model with the [CLS] head): rebuild the model with
``load_model(..., pooling=..., layers=...)`` as ``fedlora.json`` records them and use ``load_adapter``.
A head centred on public text (``model.center``) also gets ``center.safetensors``, its mean feature
(``center``) and the divisor (``scale``: the public standard deviation with ``model.scale``, else ones),
which ``load_adapter`` puts back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fed.adapters import Adapter, AdapterSpec, build, family_options, make_spec
from fed.models import loadable_name

PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
NATIVE = "adapter.safetensors"
DESCRIPTION = "fedlora.json"
CENTER = "center.safetensors"


def export_adapter(
    adapter: Adapter, out: Path, *, task: str, base_model: str, pooling: str = "cls", layers: int = 0
) -> Path:
    """Save every adapter tensor (sent or frozen-shared) and the config that describes it.

    ``adapter_config.json`` names the base model by an identifier PEFT can load (hub id or absolute path);
    ``fedlora.json`` keeps the name the run was configured with as well.
    """
    out.mkdir(parents=True, exist_ok=True)
    loadable = loadable_name(base_model, task)
    tensors = {k: v.contiguous() for k, v in adapter.state(adapter.names()).items()}
    center, scale = getattr(adapter.model, "center", None), getattr(adapter.model, "scale", None)
    head_input = (
        {"center": center, "scale": scale}
        if isinstance(center, torch.Tensor) and isinstance(scale, torch.Tensor) and bool(center.any())
        else None
    )  # a centred mean-pooled head's public mean and std
    spec = adapter.spec
    (out / DESCRIPTION).write_text(
        json.dumps(
            {
                "kind": spec.kind,
                "spec": dataclasses.asdict(spec),
                "head": adapter.head_names(),
                "rank": spec.rank,
                "alpha": spec.alpha,
                "targets": list(spec.targets),
                "task": task,
                "base_model": base_model,
                "base_model_name_or_path": loadable,
                "pooling": pooling,
                "layers": layers,
                "center": CENTER if head_input is not None else None,
                "groups": [
                    {
                        "name": g.name,
                        "trainable": g.trainable,
                        "sent": g.sent,
                        "aggregation": g.aggregation.value,
                        "params": list(g.params),
                    }
                    for g in adapter.groups
                ],
            },
            indent=2,
        )
    )
    save_file(tensors, str(out / NATIVE))
    if head_input is not None:
        save_file({k: v.contiguous() for k, v in head_input.items()}, str(out / CENTER))
    if not adapter.peft_compatible or pooling != "cls" or layers:
        return out
    lora = adapter.family.as_lora(tensors)
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in lora.items()}, str(out / "adapter_model.safetensors")
    )
    # the head's top-level modules (PEFT saves a sequence classifier's whole `classifier`, e.g. RoBERTa's two layers)
    heads = sorted({name.split(".", 1)[0] for name in adapter.head_names()})
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": PEFT_TASK_TYPES[task],
                "r": spec.rank,
                "lora_alpha": spec.alpha,
                "lora_dropout": spec.dropout,
                "target_modules": list(spec.targets),
                "bias": "none",
                # GPT-2's targets are Conv1D in the model PEFT loads (fed.models.linear_projections)
                "fan_in_fan_out": any(getattr(m, "from_conv1d", False) for m in adapter.model.modules()),
                "init_lora_weights": True,
                "modules_to_save": heads or None,
                "base_model_name_or_path": loadable,
                "inference_mode": True,
            },
            indent=2,
        )
    )
    return out


def _spec(fields: dict[str, Any]) -> AdapterSpec:
    """The spec ``fedlora.json`` records; files written before families owned their options hold them flat."""
    common = ("kind", "rank", "alpha", "targets", "dropout")
    options = fields.get("options") or family_options(
        fields["kind"], {k: v for k, v in fields.items() if k not in common}
    )
    return make_spec(
        fields["kind"], fields["rank"], fields["alpha"], tuple(fields["targets"]), fields["dropout"], **options
    )


def load_adapter(model: nn.Module, folder: str | Path) -> Adapter:
    """Inject the adapter described in ``folder`` into ``model`` (in place) with its exported values.

    ``model`` must be the base model the adapter was trained on (the same architecture and, for a
    classifier, the same number of labels). Every tensor the family declares must be in the file.
    """
    folder = Path(folder)
    description = json.loads((folder / DESCRIPTION).read_text())
    spec = _spec(description["spec"])
    adapter = build(model, spec, seed=0, head=tuple(description["head"]))
    tensors = load_file(str(folder / NATIVE))
    missing = sorted(set(adapter.names()) - set(tensors))
    if missing:
        raise ValueError(f"{folder / NATIVE} lacks adapter tensors {missing[:3]}; it does not match {spec.kind!r}")
    adapter.load(tensors)
    if description.get("center"):
        center, scale = getattr(model, "center", None), getattr(model, "scale", None)
        if not (isinstance(center, torch.Tensor) and isinstance(scale, torch.Tensor)):
            raise ValueError(f"{folder} holds a centred mean-pooled head; build the model with pooling='mean'")
        head_input = load_file(str(folder / CENTER))
        center.copy_(head_input["center"])
        scale.copy_(head_input.get("scale", torch.ones_like(scale)))  # older files: the mean only
    return adapter
