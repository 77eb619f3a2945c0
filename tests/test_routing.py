"""connector/routing.py: globs, JSON paths, matches and the events filter (pure, no I/O)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from webhook_connect.connector.routing import (
    DEFAULT,
    UNMATCHED,
    MatchConfig,
    Router,
    compile_glob,
    events_text,
    parse_json_path,
    split_events,
)


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("github*", ["github", "github-prod"], ["gitlab", "xgithub"]),
        ("pull_request?", ["pull_requests"], ["pull_request", "pull_requestss"]),
        ("[ab]*", ["a1", "b"], ["c"]),
        ("[!ab]x", ["cx"], ["ax", "x"]),
        ("[a-c].json", ["b.json"], ["bxjson", "d.json"]),
        ("a.b", ["a.b"], ["axb"]),
        ("[*]", ["*"], ["a"]),
        ("x^y$", ["x^y$"], ["xy"]),
    ],
)
def test_globs_match_whole_values(pattern: str, yes: list[str], no: list[str]) -> None:
    regex = compile_glob(pattern)
    assert all(regex.fullmatch(value) for value in yes)
    assert not any(regex.fullmatch(value) for value in no)


@pytest.mark.parametrize("pattern", ["[a", "x[", "[]", "[!]", "[z-a]"])
def test_globs_that_cannot_parse_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="bad glob"):
        compile_glob(pattern)


def test_json_paths_of_the_documented_subset() -> None:
    assert parse_json_path("$") == ()
    assert parse_json_path("$.action") == ("action",)
    assert parse_json_path("$.a[0].b") == ("a", 0, "b")
    assert parse_json_path("$['key with space'].x") == ("key with space", "x")
    assert parse_json_path('$["a.b"][12]') == ("a.b", 12)


@pytest.mark.parametrize("path", ["action", "$.", "$..a", "$[a]", "$.a[", "$['a]", "$.a b"])
def test_json_paths_outside_the_subset_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="JSON path"):
        parse_json_path(path)


def decide(router: Router, webhook: str = "github", body: object = None, **headers: str) -> int:
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    pairs = tuple((name.replace("_", "-"), value) for name, value in headers.items())
    return router.decide(webhook, pairs, raw)


def route(**match: object) -> MatchConfig:
    return MatchConfig.model_validate(match)


def test_first_matching_route_wins_and_the_rest_fall_to_the_default() -> None:
    router = Router(
        [
            route(webhook="github*", header={"X-GitHub-Event": "pull_request*"}),
            route(webhook="github*"),
            route(json={"$.type": "charge.*"}),
        ]
    )
    assert decide(router, "github", {}, x_github_event="pull_request_review") == 0
    assert decide(router, "github-2", {}, X_GitHub_Event="push") == 1
    assert decide(router, "stripe", {"type": "charge.succeeded"}) == 2
    assert decide(router, "stripe", {"type": "invoice.paid"}) == DEFAULT
    assert decide(router, "stripe", b"not json") == DEFAULT


def test_header_names_are_case_insensitive_and_any_repeated_value_matches() -> None:
    router = Router([route(header={"x-kind": "b"})])
    pairs = (("X-Kind", "a"), ("X-KIND", "b"))
    assert router.decide("w", pairs, b"") == 0
    assert router.decide("w", (("X-Kind", "a"),), b"") == DEFAULT


def test_json_values_strings_are_globs_others_compare_equal() -> None:
    router = Router(
        [
            route(json={"$.n": 1}),
            route(json={"$.flag": True}),
            route(json={"$.a[1]['b c']": "x*"}),
            route(json={"$.obj": {"k": [1, 2]}}),
            route(json={"$.none": None}),
        ]
    )
    assert decide(router, body={"n": 1.0}) == 0
    assert decide(router, body={"n": True}) == DEFAULT, "true is not 1"
    assert decide(router, body={"flag": True}) == 1
    assert decide(router, body={"flag": 1}) == DEFAULT, "1 is not true"
    assert decide(router, body={"a": [0, {"b c": "xyz"}]}) == 2
    assert decide(router, body={"a": [0, {"b c": 5}]}) == DEFAULT, "a glob matches strings only"
    assert decide(router, body={"obj": {"k": [1, 2]}}) == 3
    assert decide(router, body={"none": None}) == 4
    assert decide(router, body={"other": None}) == DEFAULT, "a missing key is not null"
    assert decide(router, body=[1, 2]) == DEFAULT


def test_the_body_is_parsed_only_when_a_condition_needs_it() -> None:
    # An earlier route decides on the webhook id: the broken body is never parsed.
    router = Router([route(webhook="a"), route(json={"$.x": 1})])
    assert router.decide("a", (), b"\xff not json") == 0
    assert router.decide("b", (), b"\xff not json") == DEFAULT


def test_events_filter_github_header_or_the_type_field() -> None:
    router = Router([], ["push", "charge.*"])
    assert decide(router, body={}, X_GitHub_Event="push") == DEFAULT
    assert decide(router, body={}, X_GitHub_Event="issues") == UNMATCHED
    assert decide(router, body={"type": "charge.refunded"}) == DEFAULT
    assert decide(router, body={"type": "invoice.paid"}) == UNMATCHED
    assert decide(router, body=b"plain") == UNMATCHED
    routed = Router([route(webhook="github")], ["push"])
    assert decide(routed, "github", {}, X_GitHub_Event="push") == 0
    assert decide(routed, "github", {}, X_GitHub_Event="issues") == UNMATCHED


def test_event_lists_from_flags_and_files() -> None:
    assert split_events("push, issues,,") == ["push", "issues"]
    assert events_text(["push", " issues "]) == "push,issues"
    for bad in ([], ["a,b"], [""], [1], ["[x"]):
        with pytest.raises(ValueError):
            events_text(bad)


@pytest.mark.parametrize(
    ("match", "where", "reason"),
    [
        ({}, (), "empty match"),
        ({"webhook": "[a"}, ("webhook",), "bad glob"),
        ({"header": {"X-A": "[a"}}, ("header",), "X-A: bad glob"),
        ({"header": {"X A": "a"}}, ("header",), "bad header name"),
        ({"json": {"action": "x"}}, ("json",), "must start with '$'"),
        ({"json": {"$.a": "[a"}}, ("json",), "bad glob"),
        ({"body": {}}, ("body",), "Extra inputs"),
    ],
)
def test_bad_matches_name_their_key(
    match: dict[str, object], where: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        MatchConfig.model_validate(match)
    [error] = caught.value.errors()
    assert tuple(error["loc"]) == where
    assert reason in error["msg"]
