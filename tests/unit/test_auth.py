"""The keys file: tenants, weights and credentials, each mistake one error naming where it is."""

from __future__ import annotations

import json

import pytest
import zmq.auth

from fs_engine.engine.auth import Keys, make_certificates


def _write(tmp_path, tenants: dict):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tenants": tenants}))
    return path


def test_keys_by_certificate_file_and_by_z85_text_and_api_key(tmp_path):
    (public, _), = make_certificates(tmp_path, ["alice"])
    bob_public, _ = zmq.auth.load_certificate(str(make_certificates(tmp_path, ["bob"])[0][0]))
    keys = Keys.load(_write(tmp_path, {"alice": {"weight": 3, "curve_keys": [public.name]},
                                       "bob": {"curve_keys": [bob_public.decode()],
                                               "api_keys": ["sk-bob-0123456789abcdef"]}}))
    alice_raw = zmq.utils.z85.decode(zmq.auth.load_certificate(str(public))[0])
    assert keys.by_curve_key[alice_raw] == "alice" and len(keys.by_curve_key) == 2
    assert keys.by_api_key == {"sk-bob-0123456789abcdef": "bob"}
    assert keys.weights == {"alice": 3.0, "bob": 1.0}
    assert keys.merged_weights("carol=2") == {"alice": 3.0, "bob": 1.0, "carol": 2.0}
    with pytest.raises(ValueError, match="'alice' weighs 2 in --tenant-weights and 3 in the keys file"):
        keys.merged_weights("alice=2")


@pytest.mark.parametrize("tenants,says", [
    ({"a": {"weight": 0, "api_keys": ["k" * 16]}}, "tenants.a.weight"),
    ({"a": {"api_keys": ["short"]}}, "tenants.a.api_keys.0"),
    ({"a": {"api_keys": ["k" * 16], "colour": "red"}}, "tenants.a.colour"),
    ({"a": {"curve_keys": ["nope"]}}, "neither a Z85 public key"),
    ({"a": {"api_keys": ["k" * 16]}, "b": {"api_keys": ["k" * 16]}}, "listed for two tenants"),
    ({"a": {}}, "lists no curve_keys or api_keys"),
])
def test_a_bad_keys_file_names_what_to_change(tmp_path, tenants, says):
    with pytest.raises(ValueError, match=says):
        Keys.load(_write(tmp_path, tenants))


def test_an_unreadable_or_non_json_keys_file_is_one_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read the keys file"):
        Keys.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        Keys.load(tmp_path / "bad.json")
