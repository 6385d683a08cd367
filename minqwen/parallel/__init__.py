"""Tensor parallelism (chapter 8): every weight matrix split across the processes of a `torchrun` job, on
PyTorch's own runtime, `torch.distributed` (NCCL between GPUs, gloo between CPU processes). `collectives` holds the
three operations the split model needs, `sharding` which slice of each weight a process holds and the modules that
hold them, `launch` joining the job."""

from minqwen import submodules_on_demand

__getattr__ = submodules_on_demand(__name__)
