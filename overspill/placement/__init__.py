"""Placement: sizes in, plan out (pure), plus the bandwidth probes that feed its prediction.

`bandwidth` (the probes) imports torch; import it as `overspill.placement.bandwidth` when needed.
"""
from .planner import (Bandwidths, Placement, Plan, PlanError, UnitCost, fmt_bytes, parse_memory, parse_size,
                      plan_placement)

__all__ = ["Bandwidths", "Placement", "Plan", "PlanError", "UnitCost", "fmt_bytes", "parse_memory", "parse_size",
           "plan_placement"]
