"""The time model: each event's formula against its closed form, and bad profiles as one-line errors. No Ray."""

from __future__ import annotations

import json
import re

import pytest

from sgd_dist.core.time_model import (
    TimeProfile,
    compute_s,
    describe,
    from_dict,
    message_s,
    server_answer_s,
    server_update_s,
    to_dict,
)

PROFILE = dict(grad_s=1e-4, grad_s_per_elem=2e-9, local_s=3e-4, local_s_per_elem=4e-9, eval_s=5e-4,
               eval_s_per_elem=6e-9, apply_s=7e-5, apply_s_per_param=8e-10, message_s=9e-6, message_s_per_byte=1e-10,
               replacement_s=1.5, restart_s=4.0, cores=2, source="hand-written for the tests", date="2026-12-01",
               ray_message_s=2e-4, ray_message_s_per_byte=3e-10)



def exactly(message: str) -> str:
    """A ``match=`` pattern for exactly ``message``."""
    return "^" + re.escape(message) + "$"


def starting(message: str) -> str:
    """A ``match=`` pattern for a message that starts with ``message``."""
    return "^" + re.escape(message)

def test_each_command_kind_costs_its_overhead_plus_its_rate_per_row_times_parameter():
    p = TimeProfile(**PROFILE)
    assert compute_s(p, "gradient", 256, 1000) == 1e-4 + 2e-9 * 256 * 1000
    assert compute_s(p, "local", 256, 1000, local_steps=5) == 5 * (3e-4 + 4e-9 * 256 * 1000)
    assert compute_s(p, "evaluate", 512, 1000) == 5e-4 + 6e-9 * 512 * 1000
    assert compute_s(p, "gradient", 256, 1000, local_steps=5) == compute_s(p, "gradient", 256, 1000)
    refused = "command kind 'stop' has no compute time; allowed: gradient, local, evaluate"
    with pytest.raises(ValueError, match=exactly(refused)):
        compute_s(p, "stop", 1, 1)


def test_the_server_costs_per_update_and_parameter_and_per_answer_and_byte():
    p = TimeProfile(**PROFILE)
    assert server_update_s(p, 1000) == 7e-5 + 8e-10 * 1000
    assert server_answer_s(p, 4000) == 9e-6 + 1e-10 * 4000
    assert server_answer_s(p, 4000, "shm") == server_answer_s(p, 4000)
    assert server_answer_s(p, 4000, "ray") == 2e-4 + 3e-10 * 4000  # the channels between nodes
    with pytest.raises(ValueError, match=exactly("transport 'tcp' has no per-answer cost; allowed: shm, ray")):
        server_answer_s(p, 4000, "tcp")


def test_the_ray_transports_costs_may_be_left_out_and_then_are_refused_by_name():
    values = {k: v for k, v in PROFILE.items() if not k.startswith("ray_")}
    p = from_dict(values)  # a profile written before they were measured
    assert p.ray_message_s is None and server_answer_s(p, 4000) == 9e-6 + 1e-10 * 4000
    refused = ("cluster.virtual.profile: this profile has no ray_message_s and ray_message_s_per_byte "
               "(sgd-dist calibrate measures them)")
    with pytest.raises(ValueError, match=exactly(refused)):
        server_answer_s(p, 4000, "ray")
    assert "ray answer    not measured" in describe(p)
    with pytest.raises(ValueError, match=exactly("p.json: ray_message_s must be >= 0 (got -1)")):
        from_dict({**values, "ray_message_s": -1}, where="p.json")


def test_one_message_takes_latency_plus_its_bits_over_the_bandwidth():
    assert message_s(1e-3, 1e9, 4000) == 1e-3 + 32_000 / 1e9
    assert message_s(1e-3, None, 4000) == 1e-3  # unlimited bandwidth
    assert message_s(0.0, 8.0, 3) == 3.0


def test_a_profile_round_trips_through_json():
    p = TimeProfile(**PROFILE)
    assert from_dict(json.loads(json.dumps(to_dict(p)))) == p
    assert to_dict(p) == PROFILE


def test_describe_names_every_term_and_where_the_numbers_came_from():
    text = "\n".join(describe(TimeProfile(**PROFILE)))
    for term in ("gradient", "local step", "evaluation", "server update", "server answer", "ray answer", "replacement",
                 "restart", "2 cores", "2026-12-01", "hand-written for the tests"):
        assert term in text, term


@pytest.mark.parametrize("field, value, message", [
    ("grad_s", -1.0, "grad_s must be >= 0 (got -1.0)"),
    ("message_s_per_byte", float("nan"), "message_s_per_byte must be >= 0 (got nan)"),
    ("restart_s", float("inf"), "restart_s must be >= 0 (got inf)"),
    ("ray_message_s_per_byte", "x", "ray_message_s_per_byte must be a number of seconds (got 'x')"),
    ("apply_s", "fast", "apply_s must be a number of seconds (got 'fast')"),
    ("eval_s", True, "eval_s must be a number of seconds (got True)"),
    ("cores", 0, "cores must be a whole number >= 1 (got 0)"),
    ("cores", 2.5, "cores must be a whole number >= 1 (got 2.5)"),
    ("source", " ", "source must say where the numbers came from (got ' ')"),
    ("date", "yesterday", "date must be an ISO date YYYY-MM-DD (got 'yesterday')"),
])
def test_a_bad_value_is_a_one_line_error_naming_the_field(field, value, message):
    values = {**PROFILE, field: value}
    with pytest.raises(ValueError) as built:
        TimeProfile(**values)
    assert str(built.value) == f"cluster.virtual.profile: {message}"
    with pytest.raises(ValueError) as loaded:
        from_dict(values, where="profile.json")
    assert str(loaded.value) == f"profile.json: {message}"


def test_a_profile_file_with_a_missing_or_unknown_field_is_refused():
    unknown = "cluster.virtual.profile: unknown field 'grad_ms'; allowed: grad_s, grad_s_per_elem, local_s, "
    with pytest.raises(ValueError, match=starting(unknown)):
        from_dict({**PROFILE, "grad_ms": 1.0})
    values = dict(PROFILE)
    del values["restart_s"]
    with pytest.raises(ValueError, match=exactly("cluster.virtual.profile: missing field 'restart_s'")):
        from_dict(values)
    with pytest.raises(ValueError, match=exactly("p.json: a profile is a mapping of its fields (got list)")):
        from_dict([1, 2], where="p.json")
