"""lion_sf_dist: LionSF (Lion Schedule-Free) with sign agreement exact under FSDP2, DDP and DeepSpeed ZeRO."""

from lion_sf_dist.coordinator import Coordinator
from lion_sf_dist.optimizer import LionSF

__all__ = ["LionSF", "Coordinator"]
__version__ = "0.1.0"
