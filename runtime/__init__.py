"""Distributed plumbing shared by the trainer and the evaluation: the layer under both.

- `runtime.launch`: which launcher started this process (torchrun, srun, plain python), the process group and
  its timeouts, the device, and tearing it down (`init_distributed`, `cleanup`).
- `runtime.collectives`: the small agreement primitives on Python objects and numbers (`barrier`,
  `all_reduce_max`, `broadcast_object`, ...); each is a no-op without a process group.
- `runtime.signals`: the stop signals (SIGUSR1 requeue, SIGTERM stop), recorded by a handler and agreed on by
  every rank at a step or batch boundary, with the exit codes and the requeue marker the Slurm scripts read.

It imports only torch, DeepSpeed (to set up its communication for training engines) and `divae.utils`; `trainer`
and `evaluation` import it, never the other way.
"""
