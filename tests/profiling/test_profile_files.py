"""Profile and trace files: exact round trips, and clear errors for truncated, tampered or foreign files."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from residency.errors import FileFormatError, ModelMismatchError
from residency.profiling.profile import Profile
from residency.profiling.trace import RoutingTrace

PROMPTS = [[1, 40, 41, 42, 43], [1, 90, 91, 92]]


@pytest.fixture(scope="module")
def profile_and_trace(tiny_model):
    return tiny_model.profile(PROMPTS, decode_tokens=2, trace=True, co_activation=2)


def test_round_trip_exact(profile_and_trace, tmp_path):
    profile, trace = profile_and_trace
    profile.save(tmp_path / "p.safetensors")
    back = Profile.load(tmp_path / "p.safetensors", fingerprint=profile.fingerprint)
    for name in ("per_prompt_counts", "per_prompt_gate_mass", "per_prompt_saliency_sum", "prompt_tokens"):
        assert torch.equal(getattr(back, name), getattr(profile, name))
    assert back.prompt_names == profile.prompt_names and back.prompt_hashes == profile.prompt_hashes
    assert back.moe_layers == profile.moe_layers and back.co_activation == profile.co_activation
    trace.save(tmp_path / "t.safetensors")
    t2 = RoutingTrace.load(tmp_path / "t.safetensors", fingerprint=trace.fingerprint)
    assert torch.equal(t2.ids, trace.ids) and torch.equal(t2.weights, trace.weights)
    assert torch.equal(t2.prompt_offsets, trace.prompt_offsets) and torch.equal(t2.is_decode, trace.is_decode)


def test_truncated_file(profile_and_trace, tmp_path):
    profile, _ = profile_and_trace
    path = profile.save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="truncated or corrupt"):
        Profile.load(path)


def _edit_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    assert len(raw) == n, "edit must not grow the header"
    path.write_bytes(data[:8] + raw + data[8 + n:])


def test_tampered_metadata(profile_and_trace, tmp_path):
    profile, _ = profile_and_trace
    path = profile.save(tmp_path / "p.safetensors")

    def break_meta(header):
        header["__metadata__"]["residency"] = header["__metadata__"]["residency"][:-20]

    _edit_header(path, break_meta)
    with pytest.raises(FileFormatError, match="tampered"):
        Profile.load(path)


def test_tampered_shapes(profile_and_trace, tmp_path):
    profile, _ = profile_and_trace
    path = profile.save(tmp_path / "p.safetensors")

    def wrong_layers(header):
        meta = json.loads(header["__metadata__"]["residency"])
        meta["moe_layers"] = meta["moe_layers"][:-1]
        header["__metadata__"]["residency"] = json.dumps(meta)

    _edit_header(path, wrong_layers)
    with pytest.raises(FileFormatError, match="moe_layers"):
        Profile.load(path)


def test_other_model_and_wrong_kind(profile_and_trace, tmp_path):
    profile, trace = profile_and_trace
    path = profile.save(tmp_path / "p.safetensors")
    with pytest.raises(ModelMismatchError, match="make a new profile"):
        Profile.load(path, fingerprint="nemotron_h-0000000000000000")
    trace_path = trace.save(tmp_path / "t.safetensors")
    with pytest.raises(FileFormatError, match="'trace' file, not a 'profile'"):
        Profile.load(trace_path)
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(FileFormatError):
        Profile.load(tmp_path / "x.safetensors")


def test_atomic_save_keeps_old_file_on_failure(profile_and_trace, tmp_path, monkeypatch):
    profile, _ = profile_and_trace
    path = profile.save(tmp_path / "p.safetensors")
    before = path.read_bytes()
    import residency.files as files

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        profile.select([0]).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_merge_refuses_other_model(profile_and_trace):
    profile, _ = profile_and_trace
    other = Profile(profile.per_prompt_counts, profile.per_prompt_gate_mass, profile.per_prompt_saliency_sum,
                    profile.prompt_tokens, "nemotron_h-other", profile.top_k, profile.moe_layers)
    with pytest.raises(ModelMismatchError, match="different models"):
        Profile.merge([profile, other])
    with pytest.raises(ModelMismatchError, match="different models"):
        profile.compare(other)


def _tensor_data_start(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return data, 8 + n, header


def test_tampered_tensor_data(profile_and_trace, tmp_path):
    profile, _ = profile_and_trace
    path = profile.save(tmp_path / "p.safetensors")
    data, start, header = _tensor_data_start(path)
    begin, _ = header["per_prompt_gate_mass"]["data_offsets"]
    pos = start + begin + 4 * 7  # one float32 of the gate-mass array
    value = struct.unpack("<f", data[pos:pos + 4])[0]
    path.write_bytes(data[:pos] + struct.pack("<f", value + 1.0) + data[pos + 4:])
    with pytest.raises(FileFormatError, match="do not match the digest"):
        Profile.load(path)


def test_impossible_counts_refused(profile_and_trace, tmp_path):
    profile, _ = profile_and_trace
    counts = profile.per_prompt_counts.clone()
    counts[0, 0, 1, 3] += 1  # one more selection than the prompt's tokens x top_k allow
    bad = Profile(counts, profile.per_prompt_gate_mass, profile.per_prompt_saliency_sum, profile.prompt_tokens,
                  profile.fingerprint, profile.top_k, profile.moe_layers)
    path = bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(FileFormatError, match="tokens × top_k"):
        Profile.load(path)
    counts[0, 0, 1, 3] -= 0.5
    half = Profile(counts, profile.per_prompt_gate_mass, profile.per_prompt_saliency_sum, profile.prompt_tokens,
                   profile.fingerprint, profile.top_k, profile.moe_layers)
    with pytest.raises(FileFormatError, match="whole numbers"):
        Profile.load(half.save(tmp_path / "half.safetensors"))


def test_weights_round_trip(profile_and_trace, tmp_path):
    profile, _ = profile_and_trace
    merged = Profile.merge([profile, profile.select([1])], weights=[0.5, 3.0])
    back = Profile.load(merged.save(tmp_path / "m.safetensors"))
    assert torch.equal(back.prompt_weights, merged.prompt_weights)
    assert torch.equal(back.counts, merged.counts) and back.tokens == merged.tokens
