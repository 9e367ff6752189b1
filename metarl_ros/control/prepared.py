"""What the control loop prepares from a reference before the joint state it will meet.

A tick combines a joint state with the reference of its instant. Much of the work depends on
the reference alone: the rigid-body model's terms (:func:`~metarl_ros.control.law.
reference_terms`), and -- for a policy that acts on the reference view of its observation
(``acts_on_reference``, e.g. PEARL's model-structured feed-forward actor) -- the action itself.
:class:`PreparedReferences` keeps that work per reference, so the loop can do it when the
reference arrives (before the joint state, or long before with a reference preview) and the
joint state's path is left with the PD feedback and the publish.

A prepared action is valid only for the policy state it was computed in: the loop stamps it
with a *version* that changes whenever that state does (a transition observed, a safe
command), and acts again at the tick if they differ.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from metarl_ros.control.law import ControlLaw, ReferenceTerms, reference_terms

Reference = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class PreparedReference:
    """The work done on one reference (q_ref, qd_ref, qdd_ref)."""

    reference: Reference
    terms: ReferenceTerms
    action: np.ndarray | None = None
    """the checked action (act_dim,) prepared for it, or None."""
    version: int = -1
    """the loop's policy-state version ``action`` was computed in."""

    def action_for(self, version: int) -> np.ndarray | None:
        """The prepared action if it was computed in policy state ``version``, else None."""
        return self.action if self.action is not None and self.version == version else None


class PreparedReferences:
    """The last few references' :class:`PreparedReference`, by identity of the reference
    tuple (the loop's inputs hand out the same tuple for the same message).

    Args:
        law: the control law whose reference terms are computed.
        size: references kept (the oldest is dropped).
    """

    def __init__(self, law: ControlLaw, size: int = 4) -> None:
        self.law = law
        self.size = size
        self._entries: OrderedDict[int, PreparedReference] = OrderedDict()

    def entry(self, reference: Reference) -> PreparedReference:
        """The entry of ``reference``, made (its terms computed) on first use."""
        key = id(reference)
        entry = self._entries.get(key)
        if entry is None or entry.reference is not reference:
            entry = PreparedReference(reference, reference_terms(self.law, reference))
            self._entries[key] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry
