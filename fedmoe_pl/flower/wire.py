"""What crosses the wire between the ServerApp and a ClientApp, and how it is counted.

A message to a client carries its pending :class:`~fedmoe_pl.algorithms.Instruction` objects in
order: each payload as an ``ArrayRecord`` named ``payload.<i>`` and all settings as one JSON list
in the ``instructions`` ConfigRecord. Replies carry the upload as the ``upload`` ArrayRecord and
numbers in the ``report`` MetricRecord. Bytes are counted as the simulation counts them (raw tensor
storage, :func:`~fedmoe_pl.aggregation.payload_bytes`), but of the arrays that arrived.

The module imports torch only when a function needs it: the ClientApp, which starts a process per
message, reads its names without paying for torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

if TYPE_CHECKING:
    from fedmoe_pl.aggregation import Payload
    from fedmoe_pl.algorithms import Instruction

INSTRUCTIONS = "instructions"
LINK = "link"  # what the server knows of the client: the fits it accepted
UPLOAD = "upload"
REPORT = "report"


def to_record(payload: Payload) -> ArrayRecord:
    return ArrayRecord({key: tensor.detach().cpu() for key, tensor in payload.items()}, keep_input=True)


def from_record(record: ArrayRecord) -> Payload:
    import torch

    return {key: torch.from_numpy(array.numpy().copy()) for key, array in record.items()}


def put_instructions(content: RecordDict, instructions: list[Instruction]) -> None:
    settings: list[dict[str, Any]] = []
    for i, instruction in enumerate(instructions):
        if instruction.payload is not None:
            content[f"payload.{i}"] = to_record(instruction.payload)
        settings.append(instruction.settings)
    content[INSTRUCTIONS] = ConfigRecord({"settings": json.dumps(settings)})


def take_instructions(content: RecordDict) -> tuple[list[Instruction], int]:
    """The instructions a message carries, in order, and the bytes of their payloads."""
    from fedmoe_pl.aggregation import payload_bytes
    from fedmoe_pl.algorithms import Instruction

    settings = json.loads(str(content.config_records[INSTRUCTIONS]["settings"]))
    out, received = [], 0
    for i, values in enumerate(settings):
        record = content.array_records.get(f"payload.{i}")
        payload = None
        if record is not None:
            payload = from_record(record)
            received += payload_bytes(payload)
        out.append(Instruction(payload, values))
    return out, received


def number(record: Mapping[str, Any], key: str) -> float:
    """A scalar of a MetricRecord or ConfigRecord (a list or text there is a protocol error)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key!r} should be a number in the message, got {value!r}")
    return value
