"""Integrations with model libraries: :func:`load` quantizes a diffusers pipeline's transformer in place;
:func:`load_nunchaku` imports a Nunchaku SVDQuant int4 FLUX.1 checkpoint.

Example:
    >>> from lowbit_engine.integrations import load, POLICIES
    >>> sorted(POLICIES)
    ['flux', 'generic', 'pixart', 'sana', 'sd3', 'wan']
"""

from __future__ import annotations

from .diffusers import LoadReport, last_report, load, save
from .nunchaku import NunchakuReport, load_nunchaku
from .policies import POLICIES, Policy, Rule, policy_for

__all__ = ["load", "save", "last_report", "LoadReport", "load_nunchaku", "NunchakuReport", "Policy", "Rule", "POLICIES",
           "policy_for"]
