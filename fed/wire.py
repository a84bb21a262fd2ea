"""The only place the library meets Flower: adapter tensors <-> records, and payload validation.

Arrays travel as Flower ``ArrayRecord``s whose ``Array``s hold each tensor's raw little-endian C-order
bytes (``stype`` ``raw-le``): dtype and shape are the Array's own fields, so no per-tensor ``.npy``
header travels (128 bytes a tensor, 1-5% of an adapter's payload) and nothing is ever unpickled or
parsed. Every incoming payload is checked (keys, stype, dtypes, shapes, exact byte size, finite
values) *before* any tensor is materialised into global state.

A payload's *transport* dtype (``wire.dtype``) may differ from its tensors' float32: ``bfloat16`` rounds
each value to bfloat16 and carries its 16 bits as ``int16`` (numpy has no bfloat16), halving the bytes.
The receiver expects exactly that carrier and widens back to float32 before checking the values.
"""

from __future__ import annotations

import io
import math
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fed.config import RunConfig, WireDtype


class PayloadError(ValueError):
    """An incoming payload that must not be aggregated; the message says why."""


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorMeta:
        return cls(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


_CARRIER = {"bfloat16": (torch.bfloat16, torch.int16, "int16")}
"""A 16-bit float numpy cannot hold: torch dtype, the integer dtype of the same width carrying its bits, numpy name."""
RAW = "raw-le"
"""``Array.stype`` of fedlora's payloads: the bare little-endian C-order bytes of the array."""


def _raw(array: np.ndarray) -> Array:
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return Array(dtype=str(array.dtype), shape=tuple(array.shape), stype=RAW, data=data.tobytes())


def to_record(tensors: Mapping[str, torch.Tensor], wire: str = "float32") -> ArrayRecord:
    """``tensors`` as an ArrayRecord, in the transport dtype ``wire`` (see the module docstring)."""
    if wire not in get_args(WireDtype):
        raise ValueError(f"wire dtype {wire!r} is not one of: {', '.join(get_args(WireDtype))}")
    if wire in _CARRIER:
        half, bits, _ = _CARRIER[wire]
        tensors = {name: t.detach().cpu().to(half).view(bits) for name, t in tensors.items()}
    return ArrayRecord({name: _raw(t.detach().cpu().numpy()) for name, t in tensors.items()})


def _on_wire(meta: TensorMeta, wire: str) -> TensorMeta:
    """What a tensor described by ``meta`` looks like in transit when sent as ``wire``."""
    if wire not in get_args(WireDtype):
        raise ValueError(f"wire dtype {wire!r} is not one of: {', '.join(get_args(WireDtype))}")
    if wire in _CARRIER and meta.dtype == "float32":
        return TensorMeta(meta.shape, _CARRIER[wire][2])
    return meta


def _decoded(data: bytes, meta: TensorMeta, copy: bool) -> torch.Tensor:
    """``data`` as a tensor of ``meta``: a writable copy, or a read-only view of the bytes themselves."""
    value = np.frombuffer(data, dtype=np.dtype(meta.dtype).newbyteorder("<")).reshape(meta.shape)
    if copy or sys.byteorder != "little":
        return torch.from_numpy(value.astype(meta.dtype))
    with warnings.catch_warnings():  # torch warns that it cannot write to it; the caller only reads
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(value)


def from_record(
    record: ArrayRecord, expected: Mapping[str, TensorMeta], wire: str = "float32", *, transport: bool = False
) -> dict[str, torch.Tensor]:
    """Validate ``record`` against ``expected`` (as sent in transport dtype ``wire``) and only then decode
    it to tensors of the expected dtype.

    ``transport=True`` decodes each tensor as a read-only view of the record's own bytes, in its transport
    dtype (bfloat16 under ``wire.dtype = "bfloat16"``): no copy, for a reader that only reads and widens one
    tensor at a time (the server's aggregation, which holds every reply of a round). Widening bfloat16 to
    float32 is exact, so what it computes is what it would compute from the widened copies.

    Raises:
        PayloadError: naming the first offending key and what was expected of it.
    """
    keys = set(record.keys())
    missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or extra:
        raise PayloadError(
            f"wrong keys: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, logical in expected.items():
        meta, array = _on_wire(logical, wire), record[name]
        if array.dtype != meta.dtype:
            raise PayloadError(
                f"{name}: dtype {array.dtype}, expected {meta.dtype}"
                + (f" (wire.dtype={wire!r})" if meta != logical else "")
            )
        if tuple(array.shape) != meta.shape:
            raise PayloadError(f"{name}: shape {tuple(array.shape)}, expected {meta.shape}")
        if array.stype != RAW:
            raise PayloadError(f"{name}: serialisation {array.stype!r}, expected {RAW!r}")
        if len(array.data) != meta.nbytes:
            raise PayloadError(f"{name}: {len(array.data)} bytes, a {meta.dtype}{meta.shape} array has {meta.nbytes}")
        tensor = _decoded(array.data, meta, copy=not transport)
        if meta != logical:  # the carrier's bits are a 16-bit float: widen to the tensor's own dtype
            tensor = tensor.view(_CARRIER[wire][0])
            if not transport:
                tensor = tensor.to(getattr(torch, logical.dtype))
        if not torch.isfinite(tensor).all():
            raise PayloadError(f"{name}: contains NaN or Inf")
        tensors[name] = tensor
    return tensors


MASK_SUFFIX = ":mask"
"""Record key of a line-sparse tensor's bit mask, next to its kept values under the tensor's own name."""


def _as_lines(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """``(lines, width)``: rows of A (axis 1) as they are, columns of B (axis 0) as rows of Bᵀ."""
    return tensor if axis == 1 else tensor.T


def to_sparse_record(
    deltas: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    lines: Mapping[str, int],
    wire: str = "float32",
) -> ArrayRecord:
    """Deltas as a record; a line-sparse tensor (``lines``: its axis) travels as its kept entries only.

    Such a tensor ``X`` becomes ``X`` = the deltas of the kept entries, ``(lines, k)`` in index order
    (every line keeps the same k), and ``X:mask`` = the mask packed to bits, ``(lines, ⌈width/8⌉)``
    uint8. Bits cost 1/32 of a float per entry: less than int16 indices once a line keeps more than
    1/16 of its width. Dense tensors are sent as ``to_record`` sends them; values travel as ``wire``.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in deltas.items():
        if name not in lines:
            out[name] = tensor
            continue
        keep = _as_lines(masks[name], lines[name]).contiguous()
        out[name] = _as_lines(tensor.detach(), lines[name])[keep].reshape(keep.shape[0], -1)
        out[name + MASK_SUFFIX] = torch.from_numpy(np.packbits(keep.numpy(), axis=1))
    return to_record(out, wire)


def from_sparse_record(
    record: ArrayRecord,
    expected: Mapping[str, TensorMeta],
    global_: Mapping[str, torch.Tensor],
    lines: Mapping[str, int],
    budgets: Mapping[str, int],
    wire: str = "float32",
    *,
    transport: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Validate a reply of ``to_sparse_record`` and decode it to dense deltas and the clients' masks
    (dense tensors as ``from_record`` decodes them under ``transport``; a rebuilt line-sparse one is a copy).

    Every line of a line-sparse tensor must keep exactly ``budgets[name]`` entries (the round's budget,
    which the server computes itself) and the mask's padding bits must be zero. A client's tensor is
    zero outside its mask, so there its delta is ``-global``: the dense delta is rebuilt with that.

    Raises:
        PayloadError: as ``from_record``, or a mask that breaks the budget.
    """
    sent = dict(expected)
    for name, axis in lines.items():
        shape = expected[name].shape
        count, width = (shape[0], shape[1]) if axis == 1 else (shape[1], shape[0])
        sent[name] = TensorMeta((count, budgets[name]), expected[name].dtype)
        sent[name + MASK_SUFFIX] = TensorMeta((count, -(-width // 8)), "uint8")
    tensors = from_record(record, sent, wire, transport=transport)
    masks: dict[str, torch.Tensor] = {}
    for name, axis in lines.items():
        width = expected[name].shape[axis]
        bits = np.unpackbits(tensors.pop(name + MASK_SUFFIX).numpy(), axis=1)
        if bits[:, width:].any():
            raise PayloadError(f"{name}: mask bits set beyond the width {width}")
        keep = torch.from_numpy(bits[:, :width].astype(bool))
        kept = sorted(set(keep.sum(1).tolist()))
        if kept != [budgets[name]]:
            raise PayloadError(f"{name}: lines keep {kept[:3]} entries; this round's budget is {budgets[name]}")
        dense = -_as_lines(global_[name], axis).clone()
        dense[keep] = tensors[name].reshape(-1).to(dense.dtype)
        tensors[name] = _as_lines(dense, axis).contiguous()
        masks[name] = _as_lines(keep, axis).contiguous()
    return tensors, masks


USAGE_PREFIX = "usage:"


def usage_metrics(counts: Mapping[str, float]) -> dict[str, float]:
    """Expert usage per slot (MoLE's routed tokens, MoR's summed router probabilities) as MetricRecord
    entries (sent only without DP)."""
    return {f"{USAGE_PREFIX}{slot}": float(n) for slot, n in counts.items()}


def read_usage(metrics: Mapping[str, Any], slots: tuple[str, ...]) -> dict[str, float] | None:
    """A reply's expert counts (None if it sent none), after checking they cover exactly ``slots``.

    Raises:
        PayloadError: unknown or missing slots, or a count that is not a finite non-negative number.
    """
    sent = {k.removeprefix(USAGE_PREFIX): v for k, v in metrics.items() if k.startswith(USAGE_PREFIX)}
    if not sent:
        return None
    if set(sent) != set(slots):
        raise PayloadError(f"expert counts for slots {sorted(sent)[:3]}..., expected exactly {list(slots)[:3]}...")
    bad = {
        k: v
        for k, v in sent.items()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
    }
    if bad:
        raise PayloadError(f"expert usage must be finite non-negative numbers; got {dict(list(bad.items())[:3])}")
    return {k: float(v) for k, v in sent.items()}


def metas(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorMeta]:
    return {name: TensorMeta.of(t) for name, t in tensors.items()}


def config_record(config: RunConfig, **extra: Any) -> ConfigRecord:
    """The whole run config, flattened, plus per-message values (the round): what a client needs."""
    return ConfigRecord({**config.to_flat(), **extra})


def config_from_record(record: ConfigRecord) -> RunConfig:
    """A client's view of the run config; unknown keys (e.g. Flower's ``server-round``) are set aside."""
    known = set(RunConfig().to_flat())
    return RunConfig.from_flat({k: v for k, v in record.items() if k in known})


# Flower's legacy records: SecAgg+ (strategies/secure.py, clients/app.py) runs only on its legacy workflow path,
# whose FitIns / FitRes carry arrays as an ordered list without names, dtypes or shapes.


def legacy_parameters(record: ArrayRecord) -> Parameters:
    """``record``'s arrays, in order, as legacy ``Parameters`` of their raw bytes (what a FitIns carries)."""
    return Parameters(tensors=[record[name].data for name in record], tensor_type=RAW)


def from_legacy_record(
    record: ArrayRecord, expected: Mapping[str, TensorMeta], wire: str = "float32"
) -> dict[str, torch.Tensor]:
    """The tensors of a FitIns's record (keys ``0..n-1`` in ``expected``'s order, dtype and shape dropped): named
    and typed from ``expected``, then validated like any payload (``from_record``)."""
    keys = sorted(record.keys(), key=lambda k: int(k) if k.isdigit() else -1)
    if keys != [str(i) for i in range(len(expected))]:
        raise PayloadError(
            f"a legacy record of {len(keys)} arrays ({keys[:3]}...), expected keys 0..{len(expected) - 1}"
        )
    named = {}
    for key, (name, logical) in zip(keys, expected.items(), strict=True):
        meta, array = _on_wire(logical, wire), record[key]
        named[name] = Array(dtype=meta.dtype, shape=meta.shape, stype=array.stype, data=array.data)
    return from_record(ArrayRecord(named), expected, wire)


def from_ndarrays(parameters: Parameters, expected: Mapping[str, TensorMeta]) -> dict[str, torch.Tensor]:
    """The float64 arrays SecAgg+ unmasked (``.npy`` bytes, Flower's own output, read without pickle), named in
    ``expected``'s order, checked for shape and finite values, in ``expected``'s dtypes."""
    arrays = [np.load(io.BytesIO(data), allow_pickle=False) for data in parameters.tensors]
    if len(arrays) != len(expected):
        raise PayloadError(f"the secure sum holds {len(arrays)} arrays, the adapter sends {len(expected)}")
    tensors = {}
    for array, (name, meta) in zip(arrays, expected.items(), strict=True):
        if tuple(array.shape) != meta.shape:
            raise PayloadError(f"{name}: shape {tuple(array.shape)} in the secure sum, expected {meta.shape}")
        tensor = torch.from_numpy(np.asarray(array, dtype=np.float64))
        if not torch.isfinite(tensor).all():
            raise PayloadError(f"{name}: the secure sum contains NaN or Inf")
        tensors[name] = tensor.to(getattr(torch, meta.dtype))  # the adapter's own dtype, as every reply's delta
    return tensors


def legacy_fitres(values: Mapping[str, np.ndarray], weight: int, metrics: Mapping[str, int | float]) -> RecordDict:
    """A train reply as ``secaggplus_mod`` reads one: the update's arrays in order (``.npy`` bytes, handed to the
    mod in this process and masked before anything leaves it), the weight and the public metrics."""
    parameters = ndarrays_to_parameters([np.asarray(v, dtype=np.float64) for v in values.values()])
    fitres = FitRes(Status(Code.OK, ""), parameters, weight, dict(metrics))
    return compat.fitres_to_recorddict(fitres, keep_input=True)
