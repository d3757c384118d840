"""Run under torchrun by tests/test_data_loaders.py: iterate an epoch, optionally save/restore loader state."""

import json
import os
import sys

import torch

from data_pipeline.loaders import DataConfig, build_loader


def main():
    data, fmt, mode, out, stop = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with open(os.path.join(out, f"pid.{mode}.{rank}"), "w") as f:
        f.write(str(os.getpid()))
    if mode in ("full", "concurrent"):  # like the trainer: process group first (the resume run lets streaming)
        torch.distributed.init_process_group("gloo")
    cfg = DataConfig(path=data, format=fmt, batch_size=4, num_workers=1, image_size=32, seed=3)
    loader = build_loader(cfg, rank, world)
    if mode == "concurrent":  # another job reads the same folder on this node at the same time
        with open(os.path.join(out, f"prefix.{rank}"), "w") as f:
            f.write(str(loader.dataset._shm_prefix_int))
    if mode == "resume":
        with open(os.path.join(out, "state.json")) as f:
            loader.load_state_dict(json.load(f))
    batches = []
    for i, b in enumerate(loader):
        batches.append({"key": b["key"], "index": b["index"].tolist(), "img": float(b["image"].sum()),
                        "shape": list(b["image"].shape)})
        if mode == "full" and i + 1 == stop:
            state = loader.state_dict()
            if rank == 0:
                with open(os.path.join(out, "state.json"), "w") as f:
                    json.dump(state, f)
    assert torch.is_tensor(b["label"])
    with open(os.path.join(out, f"{mode}.{rank}.json"), "w") as f:
        json.dump(batches, f)


if __name__ == "__main__":
    main()
