"""Layouts: how the tensors an optimizer holds map to local pieces of logical parameters.

A layout turns what the optimizer holds into :class:`Segment` s (local views of a
parameter, its gradient and ``exp_avg``, the agreement unit they count in, and the
process group over which their counts are summed). The kernel sees only segments.
"""

from lion_sf_dist.layouts.segment import Segment

__all__ = ["Segment"]
