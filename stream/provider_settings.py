"""``[[providers]]``: one upstream source each (SPEC §7). Also what every settings model shares:
the frozen base, ``${VAR}`` secrets, topic checks, and ``problem_lines``, which turns pydantic's
errors into one line per problem naming its key path (``providers[1].interval: …``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetPydanticSchema, PrivateAttr, ValidationError, ValidationInfo
from pydantic.functional_validators import AfterValidator, field_validator, model_validator
from pydantic_core import core_schema

from .errors import BadTopic
from .topics import validate_pattern, validate_topic

__all__ = ["DEMO_PATHS", "DEMO_PUSH_PATHS", "HeadlineField", "Policy", "ProviderSettings", "Resume", "environment_values", "problem_lines"]

Policy = Literal["disconnect", "drop", "conflate"]
HeadlineField = Literal["id", "title", "url", "source", "published", "summary", "symbols"]
HEADLINE_PLACEHOLDERS = frozenset({"id", "title", "source", "provider", "name"})
DEMO_PATHS = ("/demo/quotes", "/demo/news.rss", "/demo/news.json")
DEMO_PUSH_PATHS = ("/demo/stream", "/demo/ws")
PUSH_KINDS = ("sse", "websocket")
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Frozen(BaseModel):
    """A settings model: read once, never changed, and a key it does not declare is a mistake."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _no_unset_variable(value: str) -> str:
    if unset := _ENV_VAR.search(value):
        raise ValueError(f"environment variable {unset.group(1)!r} is not set or empty")
    return value


def _checked(check: Callable[[object, str], str], value: str) -> str:
    """``value`` through ``validate_topic`` or ``validate_pattern``; pydantic adds the key path."""
    try:
        return check(value, "")
    except BadTopic as exc:
        raise ValueError(exc.message.removeprefix(": ")) from None


def toml_table(key: Any, value: Any) -> GetPydanticSchema:
    """A TOML table checked as ``dict[key, value]`` (so a problem names its key), kept as (key, value) pairs."""
    pairs = core_schema.no_info_after_validator_function
    return GetPydanticSchema(lambda _, handler: pairs(lambda checked: tuple(checked.items()), handler.generate_schema(dict[key, value])))


Secret = Annotated[str, AfterValidator(_no_unset_variable)]  # fill_secrets has put in each ${VAR} that is set
Pattern = Annotated[str, AfterValidator(lambda value: _checked(validate_pattern, value))]
Overflow = Annotated[tuple[tuple[str, Policy], ...], toml_table(Pattern, Policy)]  # (pattern, policy), first match wins
Pairs = tuple[tuple[str, str], ...]


def fill_secrets(tables: Any, fields: tuple[str, ...], env: Mapping[str, str]) -> Any:
    """An array of tables with each ``${VAR}`` that ``env`` sets filled in, in ``fields`` (a string, or
    tables and arrays of them: where secrets live). An unset variable stays, for ``Secret`` to report."""

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {name: fill(item) for name, item in value.items()}
        if isinstance(value, list):
            return [fill(item) for item in value]
        return _ENV_VAR.sub(lambda match: env.get(match.group(1)) or match.group(0), value) if isinstance(value, str) else value

    if not isinstance(tables, list):
        return tables
    return [table | {field: fill(table[field]) for field in fields if field in table} if isinstance(table, dict) else table for table in tables]


Seconds = Annotated[float, Field(ge=0.1)]  # a push duration: fractions of a second allowed
Matches = Annotated[tuple[tuple[str, Any], ...], toml_table(str, Any)]  # dotted path -> value, every pair must match


class Resume(Frozen):
    """websocket: on reconnect, the URL gets ``param=<the last value of field in a data message>``."""

    param: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    field: str = Field(min_length=1)


def environment_values(table: Any, fields: tuple[str, ...], env: Mapping[str, str]) -> tuple[str, ...]:
    """The values ``env`` gives the ``${VAR}`` named in ``fields`` of ``table``: the secrets that
    filling puts in, which nothing may show (logs, errors, status)."""
    if not isinstance(table, dict):
        return ()
    names = [name for field in fields if field in table for text in _strings(table[field]) for name in _ENV_VAR.findall(text)]
    return tuple(dict.fromkeys(env[name] for name in names if env.get(name)))


class ProviderSettings(Frozen):
    """One upstream source. ``url`` of a ``demo`` provider is a path on this server, and so may
    a push provider's be (``/demo/stream``, ``/demo/ws``: this server's demo push endpoints)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    kind: Literal["feed", "json", "snapshot", "demo", "sse", "websocket"]
    url: str = Field(default="", validate_default=True)  # a demo provider's default: /demo/quotes
    interval: Annotated[float, Field(ge=1)] = 30.0  # seconds between polls
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.1  # +/- this fraction of interval, so providers do not poll in lockstep
    timeout: Annotated[float, Field(ge=0.1)] = 10.0  # seconds for a whole poll: connect, headers and body
    headers: Annotated[Pairs, toml_table(str, Secret)] = Field(default=(), repr=False)
    params: Annotated[Pairs, toml_table(str, Secret)] = Field(default=(), repr=False)
    max_bytes: Annotated[int, Field(ge=1024)] = 5 * 1024 * 1024  # decoded body
    backfill: bool = False  # publish what the first poll finds (else it only primes dedup)
    dedup_size: Annotated[int, Field(ge=1)] = 10_000  # item ids (or snapshot keys) remembered
    overflow: Policy | None = None  # overflow policy for this provider's topics
    enabled: bool = True
    items: str = ""  # json: dotted path to the list of items ("" = the document itself)
    id: str = "id"  # json: dotted path to an item's id (falls back to url / link)
    path: str = ""  # snapshot: dotted path to the value inside the document
    split: str | None = None  # snapshot: path (inside `path`) to a mapping or list; one topic per key
    key: str = ""  # snapshot: with a list to split, the field holding each entry's key
    fields: Annotated[Pairs, toml_table(HeadlineField, str)] = ()  # headline field -> dotted path in the upstream item
    source: str | None = None  # headline source when an item names none (default: feed title / name)
    # Push kinds (SPEC §7a): a long-lived connection instead of polls.
    format: Literal["json", "snapshot"] = "json"  # each message read like a json or a snapshot document
    where: Matches = ()  # a message is data only if every pair matches; others are control or heartbeat
    error: Matches = ()  # a message matching every pair is an upstream error: the connection is closed
    events: tuple[str, ...] = ("message",)  # sse: the event types that carry data
    subscribe: tuple[str | dict[str, Any], ...] = Field(default=(), repr=False)  # websocket: sent in order after every connect
    resume: Resume | None = None  # websocket: the URL parameter that resumes after a reconnect
    idle_timeout: Seconds = 90.0  # no bytes at all for this long: the connection is dead and replaced
    max_message_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024  # a larger message drops the connection
    reconnect_min: Seconds = 1.0  # full-jitter exponential backoff between connection attempts...
    reconnect_max: Seconds = 300.0  # ...up to this
    max_items_per_second: Annotated[float, Field(gt=0)] = 1000.0  # items accepted from the upstream; the excess is dropped
    # Template: {field} placeholders are filled from each item. Its default and checks read the fields above.
    topic: str = Field(default="", validate_default=True)
    # What load_settings filled in from the environment (never a setting: a TOML key cannot reach it).
    _filled: tuple[str, ...] = PrivateAttr(default=())

    @property
    def secrets(self) -> list[str]:
        """Values no message may show: every one filled in from the environment, and every header
        and parameter value long enough to be a key (they may be written into the file itself)."""
        written = [value for _, value in self.params + self.headers if len(value) >= 6]
        return list(dict.fromkeys([*self._filled, *written]))

    @property
    def headlines(self) -> bool:
        """Whether this provider publishes headlines (feed, json, demo news) rather than values."""
        return _is_headlines(self.kind, self.url, self.format)

    @property
    def push(self) -> bool:
        """Whether the upstream pushes over a connection this server holds (SPEC §7a)."""
        return self.kind in PUSH_KINDS

    @property
    def values(self) -> bool:
        """Whether its items are values (retained, published when changed) rather than headlines."""
        return not self.headlines

    def topic_pattern(self) -> str:
        """The subscription pattern covering every topic this provider can publish."""
        return ".".join("*" if "{" in part else part for part in self.topic.split("."))

    @field_validator("url")
    @classmethod
    def _url(cls, url: str, info: ValidationInfo) -> str:
        kind = info.data.get("kind")
        if kind == "demo":
            url = url or "/demo/quotes"
            if url not in DEMO_PATHS:
                raise ValueError(f"a demo provider polls one of {', '.join(DEMO_PATHS)}, got {url!r}")
        elif kind in PUSH_KINDS and url.startswith("/"):
            if url not in DEMO_PUSH_PATHS:
                raise ValueError(f"a path connects to this server's demo push endpoints, one of {', '.join(DEMO_PUSH_PATHS)}; got {url!r}")
        elif kind == "websocket":
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
        elif not url.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        return url

    @model_validator(mode="after")
    def _settings_of_its_kind(self) -> ProviderSettings:
        """A setting of another kind is a mistake (the provider would silently ignore it)."""
        only = {"sse": _SSE_ONLY, "websocket": _WEBSOCKET_ONLY}
        if self.push:
            wrong = sorted(self.model_fields_set & ({"interval", "jitter", "max_bytes"} | only["sse" if self.kind == "websocket" else "websocket"]))
            if wrong:
                raise ValueError(f"{wrong[0]}: not a setting of a {self.kind} provider")
        elif wrong := sorted(self.model_fields_set & (_PUSH_ONLY | _SSE_ONLY | _WEBSOCKET_ONLY)):
            raise ValueError(f"{wrong[0]}: only push providers (kind sse or websocket) have it")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError(f"reconnect_max: must be at least reconnect_min ({self.reconnect_min:g})")
        return self

    @field_validator("subscribe")
    @classmethod
    def _subscribe(cls, messages: tuple[str | dict[str, Any], ...]) -> tuple[str | dict[str, Any], ...]:
        for index, message in enumerate(messages):
            for text in _strings(message):
                if unset := _ENV_VAR.search(text):
                    raise ValueError(f"[{index}]: environment variable {unset.group(1)!r} is not set or empty")
        return messages

    @field_validator("topic")
    @classmethod
    def _topic(cls, topic: str, info: ValidationInfo) -> str:
        kind, name, url, form = info.data.get("kind"), info.data.get("name"), info.data.get("url"), info.data.get("format")
        if not topic and (kind == "snapshot" or (kind in PUSH_KINDS and form == "snapshot")):
            topic = f"{name}.{{key}}" if info.data.get("split") is not None else f"{name}"
        elif not topic:
            topic = "quotes.{key}" if kind == "demo" and url == "/demo/quotes" else f"news.{name}"
        # News topics may use headline fields; state topics may name any field of their values.
        unknown = [field for field in _PLACEHOLDER.findall(topic) if field not in HEADLINE_PLACEHOLDERS]
        if unknown and _is_headlines(kind, url, form):
            raise ValueError(f"unknown placeholder {{{unknown[0]}}} (allowed here: {', '.join(sorted(HEADLINE_PLACEHOLDERS))})")
        _checked(validate_topic, _PLACEHOLDER.sub("x", topic))
        return topic


_PUSH_ONLY = frozenset({"format", "where", "error", "idle_timeout", "max_message_bytes", "reconnect_min", "reconnect_max", "max_items_per_second"})
_SSE_ONLY = frozenset({"events"})
_WEBSOCKET_ONLY = frozenset({"subscribe", "resume"})


def _is_headlines(kind: object, url: object, form: object) -> bool:
    if kind in PUSH_KINDS:
        return form == "json"
    return kind in ("feed", "json") or (kind == "demo" and url != "/demo/quotes")


def _strings(value: Any) -> list[str]:
    """Every string inside a TOML value (tables and arrays walked)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list | tuple):
        return [text for item in value for text in _strings(item)]
    return []


def _unique_names(providers: tuple[ProviderSettings, ...]) -> tuple[ProviderSettings, ...]:
    names = [provider.name for provider in providers]
    if twice := next((name for index, name in enumerate(names) if name in names[:index]), None):
        raise ValueError(f"{twice!r} names more than one provider")
    return providers


Providers = Annotated[tuple[ProviderSettings, ...], AfterValidator(_unique_names)]


_TYPES = {"bool": "true or false", "int": "an integer", "float": "a number", "string": "a string", "tuple": "an array", "dict": "a table"}


def _rank(problem: Any) -> int:
    """Unknown keys first, then values of the wrong type, then the rest, as ``stream check`` always listed them."""
    return 0 if problem["type"] == "extra_forbidden" else 1 if problem["type"].endswith(("_type", "_parsing", "_from_float")) else 2


def problem_lines(error: ValidationError, prefix: tuple[str, ...] = ()) -> list[str]:
    """pydantic's ``error`` as one ``key.path: what is wrong`` line per problem; never with the value
    of a secret (a field declared ``repr=False``)."""
    secrets = {name for model in Frozen.__subclasses__() for name, field in model.model_fields.items() if not field.repr}
    lines = []
    for problem in sorted(error.errors(), key=_rank):
        loc = [*prefix, *(part for part in problem["loc"] if part != "[key]")]  # "[key]": a table's key is wrong
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if re.fullmatch(r"[\w-]+", p) else f".{p!r}" for p in loc)
        kind = problem["type"]
        got = "" if kind == "missing" or secrets.intersection(map(str, loc)) else f", got {problem['input']!r}"
        if kind == "extra_forbidden":
            what = "unknown setting" if len(loc) > 1 else "unknown section"
        elif kind == "value_error":  # one of our checks: its message says it all
            what = str(problem["ctx"]["error"])
        elif _rank(problem) == 1:
            what = f"expected {_TYPES.get(kind.partition('_')[0], 'a table')}{got}"
        else:
            what = problem["msg"][0].lower() + problem["msg"][1:] + got
        lines.append(f"{path.lstrip('.')}: {what}")
    return lines
