"""The CUDA path as close to the tested CPU path as it can be (issue 15, items 1, 3, 4 and the non-Slurm parts
of 5), checked on CPU with real DeepSpeed engines:

- one optimizer: the client `torch.optim.AdamW` on every device, never DeepSpeed's JIT-built FusedAdam;
- throughput switches: TF32 / cudnn.benchmark, channels_last, torch.compile, overlap_comm, the gradient
  communication dtype, pinned uint8 batches converted on the device (bitwise the same batch);
- host syncs: none in a training forward of the quantizer or in a decoder micro-batch's loss, one per step
  for all the metrics;
- attention: "auto" is SDPA even when xformers is importable, and no pip extra pulls xformers (and its torch);
- stop signals: SIGTERM asks to stop, SIGUSR1 to requeue, and USR1 wins; one GPU per task means cuda:0;
  streaming's shared memory is not wiped by default.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib
import torch
import torch.nn as nn
from model_fixtures import convnet

from trainer.engine import (
    DeepSpeedConfig,
    OptimConfig,
    adamw_kwargs,
    build_engine,
    client_optimizer,
    configure_backends,
    ds_config,
)

ROOT = Path(__file__).resolve().parents[1]
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """Count calls of the Tensor methods that read a value to the host (a device sync on CUDA)."""
    counts: dict[str, int] = dict.fromkeys(HOST_READS, 0)
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counts[name] += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _engine(ds: DeepSpeedConfig, module: nn.Module | None = None):
    return build_engine(module or convnet(), ds, OptimConfig(warmup_steps=0), micro_batch=2, grad_accum=1,
                        world_size=1, grad_clip=1.0, total_steps=10)


# ---- item 1: one optimizer path ---------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_never_asks_deepspeed_for_an_optimizer(stage):
    for use_cuda in (False, True):
        c = ds_config(DeepSpeedConfig(zero_stage=stage), 2, 1, 8, 1.0, OptimConfig(), use_cuda=use_cuda)
        assert "optimizer" not in c, (stage, use_cuda)  # DeepSpeed would JIT-build FusedAdam on CUDA


@pytest.mark.parametrize("stage", [1, 2])
def test_trained_engine_steps_the_client_adamw_under_bf16(single_process_group, stage):
    engine = _engine(DeepSpeedConfig(zero_stage=stage, precision="bf16"))
    x = torch.randn(2, 3, 8, 8)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    opt = client_optimizer(engine)
    assert type(opt) is torch.optim.AdamW  # the client optimizer, below DeepSpeed's ZeRO/bf16 wrapper
    assert not opt.defaults.get("fused")  # CPU parameters: the plain kernel
    assert all(int(s["step"]) == 1 for s in opt.state.values()) and opt.state  # it is the one that stepped
    assert adamw_kwargs(OptimConfig(), on_cuda=True)["fused"] is True  # CUDA: torch's fused kernel, same class
    assert "fused" not in adamw_kwargs(OptimConfig(), on_cuda=False)


def test_a_zero3_engine_leaves_torch_linear_alone(single_process_group):
    """DeepSpeed's default ZeRO-3 set-up replaces F.linear for the rest of the process; a later bf16 autocast
    nn.Linear would then save its fp32 input (seen: the CUDA planner's traces in the same pytest process)."""
    import torch.nn.functional as F

    before = F.linear
    module = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 4))
    engine = _engine(DeepSpeedConfig(zero_stage=3, precision="bf16"), module)
    engine.backward(engine(torch.randn(2, 8)).float().pow(2).mean())
    engine.step()
    assert F.linear is before


# ---- item 3: throughput switches ------------------------------------------------------------------------
def test_overlap_comm_and_gradient_communication_dtype():
    def zero(use_cuda, **kw):
        return ds_config(DeepSpeedConfig(**kw), 2, 1, 8, 1.0, OptimConfig(), use_cuda=use_cuda)

    assert zero(True, zero_stage=2)["zero_optimization"]["overlap_comm"] is True
    assert zero(True, zero_stage=1)["zero_optimization"]["overlap_comm"] is False
    assert zero(False, zero_stage=2)["zero_optimization"]["overlap_comm"] is False  # gloo: nothing to overlap
    assert zero(True, zero_stage=2, overlap_comm=False)["zero_optimization"]["overlap_comm"] is False
    assert zero(True)["communication_data_type"] == "fp32"  # explicit: DeepSpeed would reduce in bf16
    assert zero(True, grad_comm_dtype="bf16")["communication_data_type"] == "bf16"
    with pytest.raises(ValueError, match="grad_comm_dtype"):
        DeepSpeedConfig(grad_comm_dtype="fp16")


@contextlib.contextmanager
def reduced_dtypes():
    """The dtypes of the floating tensors all-reduced or reduce-scattered (torch.distributed) while open."""
    import torch.distributed as td

    seen: list[torch.dtype] = []
    saved = {n: getattr(td, n) for n in ("all_reduce", "reduce_scatter_tensor")}

    def wrap(name, fn):
        def spied(*args, **kwargs):
            t = (args[1] if len(args) > 1 else kwargs.get("input")) if name == "reduce_scatter_tensor" else \
                (args[0] if args else kwargs.get("tensor"))
            if t.is_floating_point():
                seen.append(t.dtype)
            return fn(*args, **kwargs)
        return spied

    for name, fn in saved.items():
        setattr(td, name, wrap(name, fn))
    try:
        yield seen
    finally:
        for name, fn in saved.items():
            setattr(td, name, fn)


@pytest.mark.parametrize("stage", [1, 2])
def test_gradients_are_reduced_in_the_dtype_the_config_states(single_process_group, stage):
    """Real bf16 ZeRO-1/2 engines: fp32 reduction by default (DeepSpeed alone would use bf16), bf16 by choice."""
    for asked, dtype in ((None, torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        engine = _engine(DeepSpeedConfig(zero_stage=stage, precision="bf16", grad_comm_dtype=asked))
        assert engine.communication_data_type == dtype, (stage, asked)
        loss = engine(torch.randn(2, 3, 8, 8)).float().pow(2).mean()
        with reduced_dtypes() as seen:  # the gradient reduction runs in backward (ZeRO-2 hooks, ZeRO-1 at its end)
            engine.backward(loss)
        engine.step()
        assert seen and set(seen) == {dtype}, (stage, asked, seen)


def test_cuda_math_switches():
    names = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cudnn, "benchmark")]
    saved = [getattr(m, n) for m, n in names]
    try:
        for m, n in names:
            setattr(m, n, False)
        configure_backends(DeepSpeedConfig(), use_cuda=False)
        assert [getattr(m, n) for m, n in names] == [False, False, False]  # CPU: untouched
        configure_backends(DeepSpeedConfig(), use_cuda=True)
        assert [getattr(m, n) for m, n in names] == [True, True, True]
        configure_backends(DeepSpeedConfig(tf32=False, cudnn_benchmark=False), use_cuda=True)
        assert [getattr(m, n) for m, n in names] == [False, False, False]
    finally:
        for (m, n), v in zip(names, saved):
            setattr(m, n, v)


def test_channels_last_and_compile_switches(single_process_group):
    cl = _engine(DeepSpeedConfig(zero_stage=1, channels_last=True))
    plain = _engine(DeepSpeedConfig(zero_stage=1))
    seen = {}
    x = torch.randn(2, 3, 8, 8)
    for name, e in (("cl", cl), ("plain", plain)):
        e.module.inner[3].register_forward_hook(lambda m, i, o, name=name: seen.update({name: (i[0], o)}))
        with torch.no_grad():
            out = e(x)
        seen[name] += (out,)
    (cl_in, cl_out, cl_final), (pl_in, _, pl_final) = seen["cl"], seen["plain"]
    assert cl_in.is_contiguous(memory_format=torch.channels_last) and not cl_in.is_contiguous()  # NHWC through
    assert cl_out.is_contiguous(memory_format=torch.channels_last) and pl_in.is_contiguous()
    torch.testing.assert_close(cl_final, pl_final, rtol=2e-2, atol=2e-2)  # bf16: same model, another layout
    assert cl.module.inner[0].weight.is_contiguous()  # weights keep DeepSpeed's layout
    assert plain.module.inner._compiled_call_impl is None
    compiled = _engine(DeepSpeedConfig(zero_stage=1, compile=True))
    assert compiled.module.inner._compiled_call_impl is not None  # compiled in place, on first call
    assert list(compiled.module.state_dict()) == list(plain.module.state_dict())  # checkpoints unchanged


def test_uint8_batches_convert_on_the_device_to_bitwise_the_same_images():
    from data_pipeline.loaders import DataConfig, _Loader, flip_mask
    from trainer.tasks.base import Task

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (6, 16, 16, 3), generator=g, dtype=torch.uint8)
    index = torch.arange(10, 16)
    # the float path as it was: convert on the host, then flip
    ref = raw.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    m = flip_mask(3, 1, index)
    assert 0 < int(m.sum()) < len(m)
    ref[m] = ref[m].flip(-1)
    for images_as in ("float", "uint8"):
        cfg = DataConfig(path="unused", seed=3, images_as=images_as)
        batch = _Loader(cfg, 6)._finish({"image": raw.clone(), "index": index}, epoch=1)
        assert batch["image"].dtype == (torch.uint8 if images_as == "uint8" else torch.float32)
        nbytes = batch["image"].numel() * batch["image"].element_size()
        assert nbytes == raw.numel() * (1 if images_as == "uint8" else 4)  # what a loader pins and copies
        x = Task.images(SimpleNamespace(device=torch.device("cpu")), batch)
        assert x.dtype == torch.float32 and x.is_contiguous() and torch.equal(x, ref), images_as


def test_pin_memory_follows_cuda(monkeypatch):
    from data_pipeline.loaders import DataConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert DataConfig().pin() is True and DataConfig(pin_memory=False).pin() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert DataConfig().pin() is False and DataConfig(pin_memory=True).pin() is True


# ---- item 3: host syncs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_ema", [False, True])
def test_quantizer_training_forward_reads_nothing_to_the_host(use_ema):
    from divae.quantizer import QuantizerConfig, VectorQuantizer

    vq = VectorQuantizer(32, 8, QuantizerConfig(use_ema=use_ema)).train()
    z = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), count_host_reads() as reads:
        vq(z)
        vq(z)
    assert sum(reads.values()) == 0, reads


def test_quantizer_kmeans_init_reads_the_flag_until_initialised_and_after_a_load():
    from divae.quantizer import QuantizerConfig, VectorQuantizer

    vq = VectorQuantizer(8, 4, QuantizerConfig(kmeans_init=True, kmeans_iters=2)).train()
    fresh_state = {k: v.clone() for k, v in vq.state_dict().items()}
    z = torch.randn(2, 4, 4, 4)
    with count_host_reads() as reads:
        vq(z)
    assert bool(vq.initialized)
    first = reads["__bool__"]
    assert first >= 1  # read once: not initialised yet, k-means runs
    codes = vq.codebook.detach().clone()
    with count_host_reads() as reads:
        vq(z)
    assert reads["__bool__"] == 0 and torch.equal(vq.codebook, codes)
    vq.load_state_dict(fresh_state)  # an uninitialised state again: the next forward must see it
    assert not bool(vq.initialized)
    vq(z)
    assert bool(vq.initialized)


def test_decoder_micro_batch_loss_reads_nothing_and_a_step_reads_once(single_process_group, tmp_path):
    """A bf16 decoder micro-batch that fine-tunes the encoder (VQ forward, quantizer, UNet, losses, quartiles)."""
    from divae.model import DiVAE
    from divae.vq import VQ_PRESETS
    from trainer.config import load_train_config
    from trainer.tasks import TASKS
    from trainer.tasks.base import host_means

    torch.manual_seed(0)
    DiVAE(VQ_PRESETS["tiny"]).save_pretrained(tmp_path / "vq.safetensors")
    cfg = load_train_config(ROOT / "configs/decoder_tiny.yaml", [
        "train.batch_size=2", "train.steps=10", "deepspeed.precision=bf16", "decoder.finetune_encoder=true",
        f"decoder.vq_weights={tmp_path / 'vq.safetensors'}"])
    task = TASKS["decoder"](cfg, torch.device("cpu"))
    models = task.build_models()
    engines = {n: build_engine(models[n], cfg.deepspeed, cfg.optim, micro_batch=2, grad_accum=2, world_size=1,
                               grad_clip=1.0, total_steps=10) for n in task.phases}
    task.attach(engines)
    size = cfg.data.image_size
    batch = {"image": torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8), "index": torch.arange(2)}
    micro: dict[str, list] = {}
    for _ in range(2):  # two micro-batches of one optimizer step
        with count_host_reads() as reads:
            loss, metrics = task.loss(batch, "model", 0)
        assert sum(reads.values()) == 0, reads  # was 4 .item(), 2 .cpu() and a quartile .item() each
        engines["model"].backward(loss)
        engines["model"].step()
        for k, v in metrics.items():
            micro.setdefault(k, []).append(v)
    with count_host_reads() as reads:
        means = host_means(micro)
    assert reads["tolist"] == 1 and sum(reads.values()) == 1, reads
    assert set(means) >= {"loss", "mse", "vb", "qloss"} and all(isinstance(v, float) for v in means.values())
    by_item = sum(v.item() for v in micro["loss"]) / 2
    assert means["loss"] == by_item  # the same float64 mean as reading each value with .item()


def test_host_means_leaves_out_absent_quartiles():
    from trainer.tasks.base import device_quartile_losses, host_means

    t = torch.tensor([0, 1, 900, 950])  # quartiles 0 and 3 of T=1000
    q = device_quartile_losses(t, torch.tensor([1.0, 3.0, 5.0, 7.0]), 1000, "loss")
    q2 = device_quartile_losses(torch.tensor([300, 600]), torch.tensor([2.0, 4.0]), 1000, "loss")
    out = host_means({k: [q[k], q2[k]] for k in q} | {"bad": [1.0]})
    assert out == {"loss_q0": 2.0, "loss_q1": 2.0, "loss_q2": 4.0, "loss_q3": 6.0, "bad": 1.0}
    assert "loss_q1" not in host_means({k: [v] for k, v in q.items()})


# ---- item 4: attention backend and the install ---------------------------------------------------------------
class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA (what the old "auto" rule looked at)."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def test_auto_attention_is_sdpa_even_with_xformers_importable(monkeypatch):
    import divae.attention as attn

    monkeypatch.setattr(attn, "_HAS_XFORMERS", True)

    def no_xformers(*a, **k):
        raise AssertionError("xformers was chosen")

    monkeypatch.setattr(attn, "_xformers_attention", no_xformers)
    q = torch.randn(1, 2, 5, 8).as_subclass(_FakeCuda)
    assert q.is_cuda
    out = attn.attention(q, q, q, backend="auto")
    assert torch.equal(out.as_subclass(torch.Tensor),
                       torch.nn.functional.scaled_dot_product_attention(*(q.as_subclass(torch.Tensor),) * 3))
    assert attn.resolve_backend("auto") == "sdpa" and attn.resolve_backend("xformers") == "xformers"
    with pytest.raises(AssertionError, match="xformers was chosen"):
        attn.attention(q, q, q, backend="xformers")  # only by name


def test_no_pip_extra_can_replace_torch():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta.get("optional-dependencies", {})
    assert "xformers" not in extras
    for name, reqs in extras.items():
        assert not any(r.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip() in ("xformers", "torch")
                       for r in reqs), name
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):  # installation: docs/training.md
        assert "pip install -e '.[xformers]'" not in doc.read_text(), doc


# ---- item 5 (no cluster needed) -------------------------------------------------------------------------------
def test_sigterm_asks_to_stop_and_sigusr1_to_requeue():
    from runtime import signals

    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    try:
        signals.install()
        assert signals.agreed_request() == signals.NONE and signals.received() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.agreed_request() == signals.STOP and signals.signal_of(signals.STOP) == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.agreed_request() == signals.REQUEUE  # USR1 (time limit / preemption) outranks TERM
        signals.install()  # installing again (the trainer's main, then train) keeps what was received
        assert signals.agreed_request() == signals.REQUEUE and signals.received() == signal.SIGUSR1
        assert signals.exit_for_signal(signal.SIGUSR1) == (signals.REQUEUE_EXIT_CODE, True) == (75, True)
        assert signals.exit_for_signal(signal.SIGTERM) == (signals.STOP_EXIT_CODE, False) == (143, False)
    finally:
        signals.restore()
    # restore() puts back the handlers install() replaced (not its own) and forgets what was received
    assert {s: signal.getsignal(s) for s in signals.SIGNALS} == before and signals.received() is None


def test_one_visible_gpu_per_task_uses_device_0():
    from runtime.launch import cuda_device_index

    assert cuda_device_index(3, 1) == 0  # srun bound one GPU to this task (CUDA_VISIBLE_DEVICES=<its GPU>)
    assert cuda_device_index(3, 8) == 3
    assert cuda_device_index(0, 8) == 0
    with pytest.raises(RuntimeError, match="sees 2 CUDA devices"):
        cuda_device_index(3, 2)


def test_streaming_shared_memory_is_not_wiped_by_default(tmp_path, monkeypatch):
    """A second job's loaders on the same node must not remove the first job's streaming shared memory."""
    import streaming.base.util as sutil

    from data_pipeline.loaders import DataConfig, build_loader
    from data_pipeline.shards import STANDARD_COLUMNS, ShardWriter

    assert DataConfig().clean_stale_shm is False
    with ShardWriter(str(tmp_path / "mds"), dict(STANDARD_COLUMNS), fmt="mds", shard_size=8,
                     source={"kind": "test"}) as w:
        img = torch.zeros(16, 16, 3, dtype=torch.uint8).numpy()
        from data_fixtures import encode

        for i in range(8):
            w.write({"jpg": encode(img), "label": 0, "caption": "c", "key": f"k{i}", "orig_size": "16x16"})

    def wipe(*a, **k):
        raise AssertionError("clean_stale_shared_memory called by default")

    monkeypatch.setattr(sutil, "clean_stale_shared_memory", wipe)
    loader = build_loader(DataConfig(path=str(tmp_path / "mds"), batch_size=4, num_workers=0, image_size=16))
    assert next(iter(loader))["image"].shape == (4, 3, 16, 16)


def test_engines_build_after_the_process_group_is_restarted(single_process_group):
    """runtime.launch.cleanup forgets DeepSpeed's cached groups, so a second init in the same process (two runs,
    or two test modules) builds working engines."""
    from runtime.launch import cleanup, init_distributed

    _engine(DeepSpeedConfig(zero_stage=2))
    cleanup()
    init_distributed()
    engine = _engine(DeepSpeedConfig(zero_stage=2))
    engine.backward(engine(torch.randn(2, 3, 8, 8)).float().mean())
    engine.step()
