"""Coverage-guided fuzzing (atheris / libFuzzer) of the decoder and the whole consume path.

Each input is turned into a message body in one of four ways (its first byte decides): the raw
bytes; a valid command with fuzzed fields (wrong types, huge numbers, NaN, deep nesting, lone
surrogates); a command whose URL-bound ids are fuzzed text; a valid command with fuzzed bytes
spliced in.  The body then goes through the same checks as ``tests/unit/test_hostile_input.py``
(one definition of "correct"): ``decode`` returns a model or raises ``InvalidMessage``;
``Pipeline.process`` (real provider clients over a recording transport) returns a contract
event that encodes to JSON, with a known routing key; invalid input reaches no provider; every
provider URL has the legitimate shape with each id in exactly one segment.

    .venv/bin/python ops/fuzz/fuzz_decode.py -runs=100000 -max_len=4096 [CORPUS_DIR]

Known, reported bugs are skipped while they reproduce (so a campaign looks for new ones);
``CW_FUZZ_STRICT=1`` reports them too.  See ``ops/fuzz/README.md``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["worker"]):
    from tests.unit import test_hostile_input as props
    from tests.unit.test_pipeline import LIMIT
    from worker.contract import codec

STRICT = os.environ.get("CW_FUZZ_STRICT") == "1"
if STRICT:
    props.BUG1_OPEN = props.BUG2_OPEN = props.BUG3_OPEN = False

_LOOP = asyncio.new_event_loop()
_FIELDS = sorted({*props.UPDATE, *props.ROLE, "mode", "expires_at", "issued_at", "region"})
_VALUES = ("conference.update", "conference.supervisor_role", "replace", "merge", "whisper", "")


def _nested(fdp: atheris.FuzzedDataProvider) -> Any:
    opening, closing = ("[", "]") if fdp.ConsumeBool() else ('{"a":', "}")
    depth = fdp.ConsumeIntInRange(1, 3000)
    return props.Raw(opening * depth + "1" + closing * depth)


def _huge(fdp: atheris.FuzzedDataProvider) -> Any:
    return props.Raw(("-" if fdp.ConsumeBool() else "") + "9" * fdp.ConsumeIntInRange(1, 5000))


_SCALARS: tuple[Callable[[atheris.FuzzedDataProvider], Any], ...] = (
    lambda fdp: None,
    lambda fdp: fdp.ConsumeBool(),
    lambda fdp: fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 17)),
    lambda fdp: fdp.ConsumeFloat(),
    lambda fdp: fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 64)),
    lambda fdp: fdp.PickValueInList(list(props.NASTY)),
    lambda fdp: fdp.PickValueInList(list(_VALUES)),
    _huge,
    _nested,
)
_KEYS = list(props.CONFERENCE_KEYS + props.PROFILE_KEYS)


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """A JSON-ish value: scalars of every type, hostile strings, huge literals, nesting."""
    kind = fdp.ConsumeIntInRange(0, len(_SCALARS) + (1 if depth < 6 else -1))
    if kind < len(_SCALARS):
        return _SCALARS[kind](fdp)
    if kind == len(_SCALARS):
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return {
        (fdp.PickValueInList(_KEYS) if fdp.ConsumeBool() else fdp.ConsumeUnicode(8)): _value(
            fdp, depth + 1
        )
        for _ in range(fdp.ConsumeIntInRange(0, 4))
    }


def _template(fdp: atheris.FuzzedDataProvider) -> dict[str, Any]:
    base = props.UPDATE if fdp.ConsumeBool() else props.ROLE
    return {**base, "conference": dict(base["conference"])} if "conference" in base else dict(base)


def _mutated(fdp: atheris.FuzzedDataProvider) -> bytes:
    doc = _template(fdp)
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        where = fdp.ConsumeIntInRange(0, 3)
        if where == 0:
            doc[fdp.PickValueInList(_FIELDS)] = _value(fdp)
        elif where == 1 and doc:
            doc.pop(fdp.PickValueInList(sorted(doc)))
        elif where == 2 and isinstance(doc.get("conference"), dict):
            doc["conference"][fdp.PickValueInList(list(props.CONFERENCE_KEYS))] = _value(fdp)
        else:
            doc[fdp.ConsumeUnicode(12)] = _value(fdp)
    return props.dump(doc, ascii=fdp.ConsumeBool()).encode("utf-8", "surrogatepass")


def _hostile_ids(fdp: atheris.FuzzedDataProvider) -> bytes:
    doc = _template(fdp)
    text = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(1, 300))
    if doc["type"] == "conference.update":
        doc[fdp.PickValueInList(["account_id", "conference_id"])] = text
    else:
        doc["conference_id"] = text
        doc["call_control_id"] = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(1, 600))
    if fdp.ConsumeBool():
        doc["command_id"] = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(1, 260))
    return props.dump(doc, ascii=fdp.ConsumeBool()).encode("utf-8", "surrogatepass")


def _spliced(fdp: atheris.FuzzedDataProvider) -> bytes:
    body = props.dump(_template(fdp)).encode()
    at = fdp.ConsumeIntInRange(0, len(body))
    splice: bytes = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
    return body[:at] + splice + body[at:]


def body_of(data: bytes) -> bytes:
    """The message body an input stands for."""
    if not data:
        return data
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        return rest
    fdp = atheris.FuzzedDataProvider(rest)
    return (_mutated, _hostile_ids, _spliced)[mode - 1](fdp)


def test_one_input(data: bytes) -> None:
    """libFuzzer's entry point: any exception or failed assertion is a finding."""
    body = body_of(data)
    props.check_decode(body)
    _LOOP.run_until_complete(props.check_consume(body))
    codec.identity(body, LIMIT)


def seeds() -> dict[str, bytes]:
    """Starting inputs: both commands raw, mutated, with hostile ids and spliced."""
    valid = [props.dump(props.UPDATE).encode(), props.dump(props.ROLE).encode()]
    found = {f"raw-{i}": b"\x00" + body for i, body in enumerate(valid)}
    for mode in (1, 2, 3):
        for i in range(4):
            found[f"mode{mode}-{i}"] = bytes([mode]) + bytes(range(i * 37 % 256, 256)) * 4
    found["deep"] = b"\x00" + b"[" * 3000 + b"]" * 3000
    found["nasty-id"] = b"\x00" + valid[1].replace(b"conf-1", b"..%2F?x=1#f")
    return found


def main() -> None:
    """Fill an empty corpus directory with the seeds, then hand over to libFuzzer."""
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus is not None:
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for name, data in seeds().items():
                (corpus / name).write_bytes(data)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
