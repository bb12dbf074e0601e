"""Hostile input: property-based tests over the decoder and the whole consume path.

Random bytes, JSON-ish documents (deep nesting, huge numbers, NaN, wrong types for every field),
invalid UTF-8, oversize bodies, and valid commands whose ids try to change the provider URL.  The
pipeline runs with the real provider clients (so the real URL builder) over a recording transport
that never touches the network.

The default run is quick (a few hundred examples per property).  ``CW_FUZZ_EXAMPLES=N`` raises
every property to ``N`` examples for a campaign; see ``ops/fuzz/README.md``.

Known, reported bugs (``BUG-n`` in the lead's report) are pinned by ``xfail(strict=True)``
regression tests at the end of this file: they pass while the bug is there and fail as soon as it
is fixed, so the marker is removed with the fix.  The properties skip the inputs of a known bug
only while a one-line probe shows it still reproduces, so the fix arms the full property at once.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, get_args
from urllib.parse import quote, unquote, urlsplit

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from pamqp import frame
from pamqp.header import ContentHeader
from pydantic import SecretStr

from tests.unit.test_pipeline import LIMIT, FakeProvider, make, process
from worker.contract import codec
from worker.contract.messages import COMMAND_TYPES, ErrorCode, ResultEvent
from worker.errors import InvalidMessage
from worker.pipeline.process import Outcome
from worker.providers import ProviderSuccess
from worker.providers.telnyx import TelnyxClient
from worker.providers.vinix import VinixClient
from worker.settings import ProviderConfig

EXAMPLES = int(os.environ.get("CW_FUZZ_EXAMPLES", "0"))


def budget(default: int) -> settings:
    """``default`` examples, or ``CW_FUZZ_EXAMPLES`` of them in a fuzz campaign."""
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


STATUSES = frozenset({"succeeded", "rejected", "failed", "expired"})
ERROR_CODES = frozenset(get_args(ErrorCode))
ROUTING_KEYS = frozenset(f"{t}.{s}" for t in (*COMMAND_TYPES, "unknown") for s in STATUSES)
BASE = {"vinix": "https://vinix.invalid/v2", "telnyx": "https://telnyx.invalid/v2"}
API_KEY = "k" * 64
TOKEN = "tok-0123456789abcdef"
ACCOUNT = "a" * 32
CONFERENCE = "b" * 32
UPDATE: dict[str, Any] = {
    "command_id": "c-1",
    "type": "conference.update",
    "account_id": ACCOUNT,
    "conference_id": CONFERENCE,
    "conference": {"name": "Bridge"},
}
ROLE: dict[str, Any] = {
    "command_id": "r-1",
    "type": "conference.supervisor_role",
    "conference_id": "conf-1",
    "call_control_id": "v3:abc",
    "supervisor_role": "whisper",
}
CONFERENCE_KEYS = (
    "name",
    "max_participants",
    "member",
    "moderator",
    "profile",
    "controls",
    "flags",
    "conference_numbers",
    "owner_id",
    "play_name",
    "play_entry_tone",
    "extra_key",
)
PROFILE_KEYS = ("max-members", "max_members", "interval", "rate", "energy-level", "alone-sound")
# Strings that could change a URL, a header or a log line if they were ever pasted in raw.
NASTY = (
    "../",
    "..",
    ".",
    "/",
    "\\",
    "%2F",
    "%2f",
    "..%2F",
    "%2e%2e",
    "%252F",
    "?x=1",
    "#frag",
    "&a=b",
    ";p",
    "@evil.example",
    "http://evil.example/",
    "%00",
    "\x00",
    "\r\n",
    "\n",
    "\t",
    " ",
    "%",
    "\x7f",
    "\x85",
    "\u2028",
    "\u202e",
    "\ufeff",
    "\uff0f",
    "%c0%af",
    "é",
    "😀",
    "X-Injected: 1",
)


# --- the recording transport and the providers over it ------------------------------------------


class RecordingTransport(httpx.MockTransport):
    """The transport under the real JsonHttp (request building, JSON encoding, answer parsing):
    remembers every request exactly as it reached the transport (method, URL, all headers) and
    answers it with a 2xx (a token for ``/api_auth``); never opens a connection."""

    def __init__(self) -> None:
        super().__init__(self.answer)
        self.sent: list[tuple[str, httpx.URL, dict[str, str]]] = []

    def answer(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url, dict(request.headers)))
        if request.url.raw_path.endswith(b"/api_auth"):
            return httpx.Response(200, content=orjson.dumps({"auth_token": TOKEN}))
        return httpx.Response(200, content=orjson.dumps({"data": {"result": "ok"}}))


class Through(FakeProvider):
    """A real provider client behind the test pipeline's provider slot."""

    def __init__(self, client: VinixClient | TelnyxClient, http: RecordingTransport) -> None:
        super().__init__(client.name)
        self.client = client
        self.http = http

    async def execute(self, command: Any) -> ProviderSuccess:
        self.calls += 1
        return await self.client.execute(command)


def providers() -> tuple[Through, Through]:
    """Real Vinix and Telnyx clients, each over its own recording transport."""
    vinix_http, telnyx_http = RecordingTransport(), RecordingTransport()
    vinix_config = ProviderConfig("vinix", BASE["vinix"], SecretStr(API_KEY))
    telnyx_config = ProviderConfig("telnyx", BASE["telnyx"], SecretStr(API_KEY))
    vinix = VinixClient(vinix_config, transport=vinix_http)
    telnyx = TelnyxClient(telnyx_config, transport=telnyx_http)
    return Through(vinix, vinix_http), Through(telnyx, telnyx_http)


async def consume(body: bytes) -> tuple[Outcome, Through, Through]:
    """One delivery through a fresh pipeline with the real clients; the outcome and the clients."""
    vinix, telnyx = providers()
    outcome = await process(make(vinix=vinix, telnyx=telnyx), body)
    return outcome, vinix, telnyx


def note(label: str) -> None:
    """Count ``label`` in Hypothesis' statistics (a no-op outside a property)."""
    if currently_in_test_context():
        event(label)


# --- known bugs: probes and guards ---------------------------------------------------------------


def utf8(value: str | None) -> bool:
    """True when ``value`` can be sent as UTF-8 (no lone surrogates)."""
    if value is None:
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


BIG_INT_BODY = orjson.dumps({**UPDATE, "conference": {"name": "x"}}).replace(
    b'"name":"x"', b'"name":"x","max_participants":99999999999999999999'
)
SURROGATE_BODY = b'{"command_id": "\\ud800", "type": "conference.delete"}'


def bug1_open() -> bool:
    """BUG-1: codec.identity echoes a lone surrogate, so the result event cannot be encoded."""
    ident = codec.identity(SURROGATE_BODY, LIMIT)
    return not (utf8(ident.command_id) and utf8(ident.type))


def bug3_open() -> bool:
    """BUG-3: an integer beyond 64 bits passes validation and then crashes orjson."""
    try:
        command = codec.decode(BIG_INT_BODY, LIMIT)
    except InvalidMessage:
        return False
    try:
        codec.fingerprint(command)
    except TypeError:
        return True
    return False


def incoming(**properties: Any) -> Any:
    """A stand-in for the delivery the consumer answers (no properties unless given)."""
    names = ("correlation_id", "reply_to", "content_type", "content_encoding", "message_id")
    fields = dict.fromkeys(
        (*names, "timestamp", "type", "app_id", "priority", "user_id", "exchange")
    )
    fields.update(body=b"{}", headers={}, routing_key="conference.update")
    return SimpleNamespace(**{**fields, **properties})


def marshal_answers(outcome: Outcome, delivery: Any = None) -> None:
    """Build the result message and the dead letter as the worker does and marshal them.

    The publish options come from :mod:`worker.app.settle`; FastStream's own encoder (the one
    its publishers use) turns them into the AMQP message.
    """
    from faststream.rabbit.parser import AioPikaParser

    from worker.app.settle import dead_letter_options, result_options

    def message(body: bytes, options: dict[str, Any]) -> Any:
        options = {k: v for k, v in options.items() if k != "mandatory"}
        encoding = AioPikaParser.encode_message(body, **options)
        with ThreadPoolExecutor(1) as pool:  # a loop of its own, also inside an async test
            return pool.submit(asyncio.run, encoding).result()

    body = codec.encode(outcome.event)
    delivery = delivery or incoming()
    result = message(body, result_options(outcome, delivery))
    ContentHeader(0, len(body), result.properties).marshal()
    if outcome.dead_letter:
        dead = message(delivery.body, dead_letter_options(outcome, delivery))
        ContentHeader(0, len(dead.body), dead.properties).marshal()


def too_long_for_amqp(value: str | None) -> bool:
    """True when ``value`` would not fit an AMQP short string (255 UTF-8 bytes)."""
    return value is not None and len(value.encode("utf-8", "surrogatepass")) > 255


def bug2_open() -> bool:
    """BUG-2: the result's correlation_id falls back to a command_id that may exceed 255 bytes."""
    event = {"command_id": "é" * 128, "type": None, "status": "rejected", "error": None}
    try:
        marshal_answers(Outcome(event, "unknown.rejected", dead_letter=False))
    except TypeError:
        return True
    return False


BUG1_OPEN = bug1_open()
BUG2_OPEN = bug2_open()
BUG3_OPEN = bug3_open()


def known_bug(body: bytes) -> str | None:
    """The open known bug that ``body`` triggers, if any (such inputs are skipped meanwhile)."""
    if BUG1_OPEN:
        ident = codec.identity(body, LIMIT)
        if not (utf8(ident.command_id) and utf8(ident.type)):
            return "BUG-1"
    if BUG3_OPEN:
        try:
            command = codec.decode(body, LIMIT)
        except InvalidMessage:
            return None
        try:
            codec.fingerprint(command)
        except TypeError:
            return "BUG-3"
    return None


# --- strategies ----------------------------------------------------------------------------------


class Raw(str):
    """A JSON number literal written as is (huge integers, exponents Python cannot hold)."""


def dump(value: Any, ascii: bool = True) -> str:
    """JSON text of ``value``, allowing NaN/Infinity, raw literals and lone surrogates.

    With ``ascii`` strings are escaped (a lone surrogate becomes ``\\udXXX``); without, they are
    written raw, and a lone surrogate becomes invalid UTF-8 once encoded with ``surrogatepass``.
    """
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii)
    if isinstance(value, list):
        return "[" + ",".join(dump(item, ascii) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{dump(str(k), ascii)}:{dump(v, ascii)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    return json.dumps(value, allow_nan=True)


hostile_text = st.one_of(
    st.lists(st.sampled_from(NASTY) | st.text(max_size=4), min_size=1, max_size=8).map("".join),
    st.text(min_size=1, max_size=40),
    st.text(
        st.characters(codec="utf-8", categories=("Cc", "Cf", "Zs", "Zl", "Zp", "Co")), max_size=20
    ),
    st.integers(1, 800).map(lambda n: "x" * n),
    st.integers(1, 300).map(lambda n: "😀" * n),
)
raw_numbers = st.one_of(
    st.integers(1, 6000).map(lambda n: Raw("9" * n)),
    st.integers(1, 6000).map(lambda n: Raw("-" + "1" * n)),
    st.sampled_from([Raw("1e400"), Raw("-1e400"), Raw("1E-400"), Raw("0.1e99999"), Raw("-0")]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 2),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["NaN", "Infinity", "-0", "1e999", "true", "5", "\ud800", "\udfff"]),
    hostile_text,
    raw_numbers,
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(CONFERENCE_KEYS), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def mutated_commands(draw: st.DrawFn) -> bytes:
    """A valid command of either type with a few fields replaced, deleted or added."""
    doc: dict[str, Any] = json.loads(json.dumps(draw(st.sampled_from([UPDATE, ROLE]))))
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.sampled_from(["top", "add", "delete", "conference", "profile"]))
        value = draw(json_values)
        if where == "top":
            doc[draw(st.sampled_from(sorted({*UPDATE, *ROLE, "mode", "expires_at"})))] = value
        elif where == "add":
            doc[draw(st.text(max_size=12))] = value
        elif where == "delete" and doc:
            doc.pop(draw(st.sampled_from(sorted(doc))))
        elif isinstance(doc.get("conference"), dict):
            if where == "conference":
                doc["conference"][draw(st.sampled_from(CONFERENCE_KEYS))] = value
            else:
                doc["conference"]["profile"] = {draw(st.sampled_from(PROFILE_KEYS)): value}
    return dump(doc, ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


INVALID_UTF8 = (
    b"\xff",
    b"\xfe",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\x80",
    b"\xe2",
)


@st.composite
def broken_utf8(draw: st.DrawFn) -> bytes:
    """A valid command with invalid UTF-8 bytes spliced in (inside strings or between tokens)."""
    body = orjson.dumps(draw(st.sampled_from([UPDATE, ROLE])))
    at = draw(st.integers(0, len(body)))
    return body[:at] + draw(st.sampled_from(INVALID_UTF8)) + body[at:]


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    """Nesting from 1 to 20 000 levels, bare or inside a valid command's conference document."""
    depth = draw(st.integers(1, 20_000))
    opening, closing = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    nested = opening * depth + b"1" + closing * depth
    if draw(st.booleans()):
        return nested
    return orjson.dumps(UPDATE).replace(b'{"name":"Bridge"}', b'{"name":"B","x":' + nested + b"}")


@st.composite
def oversize(draw: st.DrawFn) -> bytes:
    """A valid command padded with white space to just over the size limit."""
    body = orjson.dumps(draw(st.sampled_from([UPDATE, ROLE])))
    return body + b" " * (LIMIT - len(body) + draw(st.integers(1, 4096)))


@st.composite
def hostile_ids(draw: st.DrawFn) -> bytes:
    """A command whose URL-bound ids (and other strings) are hostile text."""
    if draw(st.booleans()):
        doc = {
            **ROLE,
            "conference_id": draw(hostile_text),
            "call_control_id": draw(hostile_text),
            "command_id": draw(hostile_text | st.just("c-1")),
        }
        if draw(st.booleans()):
            doc["whisper_call_control_ids"] = draw(st.lists(hostile_text, max_size=3))
    else:
        doc = {
            **UPDATE,
            draw(st.sampled_from(["account_id", "conference_id"])): draw(hostile_text),
            "command_id": draw(hostile_text | st.just("c-1")),
        }
    return orjson.dumps(doc)


any_body = st.one_of(
    st.binary(max_size=512),
    json_values.map(lambda v: dump(v).encode("utf-8", "surrogatepass")),
    mutated_commands(),
    broken_utf8(),
    hostile_ids(),
)


# --- properties ----------------------------------------------------------------------------------


def check_decode(body: bytes) -> None:
    """decode returns a command model or raises InvalidMessage; identity never raises."""
    command: codec.AnyCommand | None = None
    failure: InvalidMessage | None = None
    try:
        command = codec.decode(body, LIMIT)
    except InvalidMessage as exc:
        failure = exc
    if failure is not None:
        assert failure.code in {"invalid_json", "invalid_command", "unknown_type", "too_large"}
        assert failure.status == "rejected"
    else:
        assert command is not None
        assert command.type in COMMAND_TYPES
        if known_bug(body) is None:
            assert re.fullmatch(r"[0-9a-f]{32}", codec.fingerprint(command))
    ident = codec.identity(body, LIMIT)
    for value in (ident.command_id, ident.type):
        assert value is None or (isinstance(value, str) and 0 < len(value) <= 200)


async def check_consume(body: bytes) -> None:
    """process returns a contract Outcome; invalid input never reaches a provider."""
    bug = known_bug(body)
    if bug is not None:
        note(f"skipped: known {bug}")
        return
    outcome, vinix, telnyx = await consume(body)
    event = outcome.event
    assert event["status"] in STATUSES
    assert outcome.routing_key in ROUTING_KEYS
    expected_type = event["type"] if event["type"] in COMMAND_TYPES else "unknown"
    assert outcome.routing_key == f"{expected_type}.{event['status']}"
    assert orjson.loads(codec.encode(event))["status"] == event["status"]
    ResultEvent.model_validate(event)
    if event["error"] is not None:
        assert event["error"]["code"] in ERROR_CODES
    assert outcome.dead_letter == (event["status"] != "succeeded")
    if BUG2_OPEN and too_long_for_amqp(event["command_id"]):
        note("skipped marshalling: known BUG-2")
    else:
        marshal_answers(outcome)
    try:
        command = codec.decode(body, LIMIT)
    except InvalidMessage:
        assert (vinix.calls, telnyx.calls, vinix.http.sent, telnyx.http.sent) == (0, 0, [], [])
        assert event["status"] == "rejected"
        note(f"rejected: {event['error']['code']}")
        return
    note(f"valid: {event['status']}")
    check_requests(command, vinix.http.sent + telnyx.http.sent)


def check_requests(
    command: codec.AnyCommand, sent: list[tuple[str, httpx.URL, dict[str, str]]]
) -> None:
    """Every request has one of the legitimate shapes, the ids exactly in their segments."""
    provider = "vinix" if command.type == "conference.update" else "telnyx"
    if provider == "vinix":
        ids = [command.account_id, command.conference_id]  # type: ignore[union-attr]
        wanted = ["", "v2", "accounts", ids[0], "conferences", ids[1]]
    else:
        wanted = ["", "v2", "conferences", command.conference_id, "actions", "update"]
    shapes = [wanted, ["", "v2", "api_auth"]]
    assert sent, "a valid command reached no provider"
    for method, url, headers in sent:
        parts = urlsplit(str(url))
        assert (parts.scheme, parts.netloc) == tuple(urlsplit(BASE[provider])[:2])
        assert (parts.query, parts.fragment) == ("", "")
        raw = parts.path.split("/")
        assert [unquote(s) for s in raw] in shapes, (method, str(url))
        for segment, decoded in zip(raw, [unquote(s) for s in raw], strict=True):
            assert segment == quote(decoded, safe="")
            assert re.fullmatch(r"[A-Za-z0-9._~%-]*", segment)
        for name, value in headers.items():
            assert not re.search(r"[\x00-\x1f\x7f]", f"{name}{value}"), (name, value)
    assert [unquote(s) for s in urlsplit(str(sent[-1][1])).path.split("/")] == wanted


@budget(600)
@given(any_body)
def test_decode_accepts_a_model_or_raises_invalid_message(body: bytes) -> None:
    """Whatever the bytes, decode returns a command or raises InvalidMessage, nothing else."""
    check_decode(body)


@budget(300)
@given(st.one_of(deep(), oversize(), raw_numbers.map(lambda r: str(r).encode())))
def test_decode_survives_depth_size_and_huge_numbers(body: bytes) -> None:
    """Deep nesting, oversize bodies and huge number literals end in a model or InvalidMessage."""
    check_decode(body)


@budget(400)
@given(any_body)
async def test_consume_path_always_answers_with_a_contract_event(body: bytes) -> None:
    """Any body gives one Outcome: contract status, JSON event, known routing key, no provider."""
    await check_consume(body)


@budget(150)
@given(st.one_of(deep(), oversize()))
async def test_consume_path_survives_depth_and_size(body: bytes) -> None:
    """Deep nesting and oversize bodies are answered, never crash, never reach a provider."""
    await check_consume(body)


@budget(400)
@given(hostile_ids())
async def test_hostile_ids_never_change_the_provider_url(body: bytes) -> None:
    """Ids with ../, %2F, ?, #, NUL, CR/LF...: rejected, or exactly one segment each in the URL."""
    await check_consume(body)


@budget(200)
@given(st.text(min_size=1, max_size=128).filter(lambda s: s not in {".", ".."} and "/" not in s))
async def test_every_acceptable_telnyx_id_maps_to_one_segment(conference_id: str) -> None:
    """A Telnyx conference id that passes validation is exactly one, reversible, path segment."""
    await check_consume(orjson.dumps({**ROLE, "conference_id": conference_id}))


# --- examples pinned from the campaigns and the issue ---------------------------------------------


@pytest.mark.parametrize(
    "conference_id",
    ["..%2F", "%2e%2e", "a/../b", "a?x=1", "a#frag", "a%00", "\x00", "a\r\nX: 1", "...", "%", "🙂"],
)
async def test_path_injection_examples_keep_the_path(conference_id: str) -> None:
    """The issue's examples: rejected, or carried as one percent-encoded segment."""
    await check_consume(orjson.dumps({**ROLE, "conference_id": conference_id}))


@pytest.mark.parametrize(
    ("field", "value"),
    [("account_id", "../" + "a" * 29), ("conference_id", "b" * 31 + "?"), ("account_id", "%2F")],
)
async def test_vinix_ids_outside_the_kazoo_format_never_reach_vinix(field: str, value: str) -> None:
    """Vinix ids must be Kazoo ids, so no hostile text ever reaches the Vinix URL."""
    outcome, vinix, _ = await consume(orjson.dumps({**UPDATE, field: value}))
    assert (outcome.status, outcome.event["error"]["code"], vinix.http.sent) == (
        "rejected",
        "invalid_command",
        [],
    )


def test_nan_and_huge_literals_in_the_conference_keep_decode_total() -> None:
    """NaN, Infinity and 400-digit literals inside the conference never escape decode."""
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"9" * 400, b"-" + b"9" * 5000):
        body = orjson.dumps(UPDATE).replace(b'"Bridge"', b'"B","x":' + literal)
        check_decode(body)


# --- regression tests for the bugs the campaigns found (xfail until the lead's fix) ---------------

BUG1 = "BUG-1: codec.identity echoes lone surrogates; the result event cannot be encoded"
BUG2 = "BUG-2: a command_id over 255 UTF-8 bytes becomes a correlation_id AMQP cannot carry"
BUG3 = "BUG-3: integers beyond 64 bits pass validation, then orjson raises in fingerprint"
BUG4 = "BUG-4: pamqp cannot decode some properties RabbitMQ accepts; the connection dies"
BUG5 = "BUG-5: publishers can set our retry headers; delivery_of crashes on a non-finite one"
BUG6 = "BUG-6: a header value that is not UTF-8 decodes to bytes, which pamqp cannot re-encode"


@pytest.mark.parametrize(
    "body",
    [SURROGATE_BODY, b'{"command_id": "ok", "type": "x\\udfff"}', b'{"command_id": "a\\ud800b"}'],
)
async def test_bug1_lone_surrogate_in_an_invalid_message_still_gets_an_event(body: bytes) -> None:
    """An invalid message echoing a lone surrogate still yields an encodable result event."""
    outcome, _, _ = await consume(body)
    assert outcome.status == "rejected"
    codec.encode(outcome.event)


@pytest.mark.parametrize("command_id", ["é" * 128, "😀" * 64, "€" * 200])
async def test_bug2_long_utf8_command_id_still_gets_a_result_message(command_id: str) -> None:
    """A valid command_id of 200 non-ASCII characters still gives a result AMQP can carry."""
    outcome, _, telnyx = await consume(orjson.dumps({**ROLE, "command_id": command_id}))
    assert (outcome.status, telnyx.calls) == ("succeeded", 1)
    marshal_answers(outcome)


@pytest.mark.parametrize(
    "conference",
    [
        b'{"max_participants": 99999999999999999999}',
        b'{"max_participants": "99999999999999999999"}',
        b'{"max_participants": -9223372036854775809}',
        b'{"controls": {"a": [18446744073709551616]}}',
    ],
)
async def test_bug3_integers_beyond_64_bits_are_rejected(conference: bytes) -> None:
    """A conference document with an integer orjson cannot write is rejected invalid_command."""
    body = orjson.dumps(UPDATE).replace(b'{"name":"Bridge"}', conference)
    outcome, vinix, _ = await consume(body)
    assert (outcome.status, outcome.event["error"]["code"], vinix.calls) == (
        "rejected",
        "invalid_command",
        0,
    )


def content_header(properties: bytes, flags: int) -> bytes:
    """A raw AMQP content header frame (class 60) on channel 1 with the given property bytes."""
    payload = struct.pack(">HHQH", 60, 0, 2, flags) + properties
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


def nested_table(depth: int) -> bytes:
    """A headers table nested ``depth`` levels deep ({"n": {"n": ... {}}})."""
    table = struct.pack(">I", 0)
    for _ in range(depth):
        entry = b"\x01nF" + table
        table = struct.pack(">I", len(entry)) + entry
    return table


@pytest.mark.parametrize(
    ("properties", "flags"),
    [
        (struct.pack(">Q", 2**64 - 1), 0x0040),  # timestamp past year 9999
        (b"\x02\xff\xfe", 0x0400),  # correlation_id that is not UTF-8
        (struct.pack(">I", 4) + b"\x01\xfft\x01", 0x2000),  # header name that is not UTF-8
        (nested_table(2000), 0x2000),  # headers nested 2 000 deep
    ],
    ids=["timestamp", "correlation_id", "header-name", "deep-headers"],
)
def test_bug4_properties_rabbitmq_accepts_can_be_decoded(properties: bytes, flags: int) -> None:
    """Every content header RabbitMQ forwards decodes (the worker's connection must not die)."""
    from worker.app import hardening

    hardening.install()  # as the worker does when it starts

    frame.unmarshal(content_header(properties, flags))


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_bug5_non_finite_retry_header_does_not_crash_delivery_of(value: float) -> None:
    """A cw-attempts: inf/NaN header (even on a message back from our delay) is ignored."""
    from worker.app.settle import delivery_of

    message = incoming(body=orjson.dumps(ROLE), exchange="", headers={"cw-attempts": value})
    delivery_of(message)


def test_bug5_publisher_cannot_forge_retry_state() -> None:
    """Retry headers on a message a publisher sent (not back from our delay) are ignored."""
    from worker.app.settle import delivery_of

    forged = {"cw-attempts": 99, "cw-not-before": 1e18, "cw-budget-used-s": 1e9}
    message = incoming(body=orjson.dumps(ROLE), exchange="conference.commands", headers=forged)
    delivery = delivery_of(message)
    assert (delivery.retry.attempts, delivery.not_before) == (0, None)


async def test_bug6_header_bytes_survive_into_the_dead_letter() -> None:
    """A long-string header that is not UTF-8 (as decoded off the wire) can be dead-lettered."""
    from worker.app import hardening

    hardening.install()  # as the worker does when it starts

    entry = b"\x04blobS" + struct.pack(">I", 2) + b"\xff\xfe"
    table = struct.pack(">I", len(entry)) + entry
    decoded = frame.unmarshal(content_header(table, 0x2000))[2]
    assert isinstance(decoded, ContentHeader)
    headers = decoded.properties.headers
    outcome, _, _ = await consume(orjson.dumps({**ROLE, "supervisor_role": "shout"}))
    assert outcome.dead_letter
    marshal_answers(outcome, incoming(headers=headers))
