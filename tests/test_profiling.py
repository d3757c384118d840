"""logging.profile_every (a torch.profiler Chrome trace of a few steps) and logging.memory_snapshot_on_oom,
both off by default (issue 25, item 8), on CPU: the traces of a real bf16-autocast training loop."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.metrics import LoggingConfig
from trainer.profiling import StepProfiler, oom_snapshot


def test_profiler_writes_a_chrome_trace_of_the_last_steps_of_every_window(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prof = StepProfiler(every=3, active=2, folder=tmp_path, rank=0, device=torch.device("cpu"))
    for step in range(1, 8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(2, 3, 16, 16)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        prof.step(step)
    prof.close()  # step 7 opened the window of steps 8-9: closed, nothing written
    assert [p.name for p in prof.traces] == ["step_00000003_rank00000.json", "step_00000006_rank00000.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in prof.traces]
    events = json.loads(prof.traces[1].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {"ProfilerStep#5", "ProfilerStep#6"} <= names and not any(n.startswith("ProfilerStep#4") for n in names)
    assert "aten::convolution" in names or "aten::conv2d" in names
    assert any(n.startswith("aten::group_norm") or n == "aten::native_group_norm" for n in names)


def test_off_by_default_and_checked(tmp_path):
    cfg = LoggingConfig()
    assert cfg.profile_every == 0 and cfg.memory_snapshot_on_oom is False
    prof = StepProfiler(cfg.profile_every, cfg.profile_steps, folder=tmp_path, rank=0, device=torch.device("cpu"))
    for step in range(1, 5):
        prof.step(step)
    assert prof.traces == [] and prof.prof is None and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="profile_every"):
        LoggingConfig(profile_every=2, profile_steps=2)


def test_oom_snapshot_is_cuda_only_and_never_swallows_the_error(tmp_path):
    with pytest.raises(torch.OutOfMemoryError), oom_snapshot(True, tmp_path, 0, torch.device("cpu")):
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert list(tmp_path.iterdir()) == []  # no allocator history on a CPU: nothing written
