"""``horovod.torch.optimizer``'s public name, so code that imports that module works after
``horovod.torch`` -> ``gradfuse``. (gradfuse's own optimizers, LARS and friends, are
``gradfuse.optim``.)"""

from .distributed_optimizer import DistributedOptimizer

__all__ = ["DistributedOptimizer"]
