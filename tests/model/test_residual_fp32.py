"""``residual_in_fp32``: the residual stream is carried in fp32 when the config asks for it."""

from __future__ import annotations

import json

import torch

from residency import OffloadedNemotron
from residency.testing import write_tiny_checkpoint


def _with_flag(folder, value: bool):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw["residual_in_fp32"] = value
    path.write_text(json.dumps(raw))
    return OffloadedNemotron.from_pretrained(folder, device="cpu")


def test_residual_stream_dtype_follows_the_flag(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "bf16", seed=4, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (1, 13))
    results = {}
    for flag in (False, True):
        model = _with_flag(folder, flag)
        assert model.config.residual_in_fp32 is flag
        dtypes = []
        hooks = [b.register_forward_hook(lambda mod, inp, out, seen=dtypes: seen.append(out.dtype))
                 for b in model.model.backbone.layers]
        results[flag] = model(ids)
        for h in hooks:
            h.remove()
        assert set(dtypes) == {torch.float32 if flag else torch.bfloat16}
    # bf16 residual adds round to bf16 at every block; fp32 ones do not, so the logits differ
    assert not torch.equal(results[False], results[True])


def test_flag_changes_nothing_in_fp32(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "fp32", seed=4)
    ids = torch.randint(0, 256, (2, 9))
    assert torch.equal(_with_flag(folder, False)(ids), _with_flag(folder, True)(ids))
