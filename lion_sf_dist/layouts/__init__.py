"""Layouts: how the tensors an optimizer holds map to local pieces of logical parameters.

:class:`Layout` is the interface (:mod:`lion_sf_dist.layouts.base`); :class:`ParamLayout`
serves plain and DTensor parameters, :class:`~lion_sf_dist.layouts.zero.ZeroLayout`
DeepSpeed ZeRO partitions (imported from its module: it is built by
:func:`lion_sf_dist.deepspeed.attach`). The kernel sees only :class:`Segment` s.
"""

from lion_sf_dist.layouts.base import Fragment, Layout, Segment
from lion_sf_dist.layouts.params import ParamLayout

__all__ = ["Fragment", "Layout", "ParamLayout", "Segment"]
