"""What the control loop asks of its policy, and when.

:class:`PolicyCalls` is the policy's side of
:class:`~metarl_ros.control.controller.AdaptiveController`: the observation a tick acts on and
the transition it hands over (built with the shared law: :func:`~metarl_ros.control.law.
build_observation`, :func:`~metarl_ros.control.law.tracking_reward`), the previous action the
next observation carries, and what is prepared from a reference before its joint state
(:mod:`~metarl_ros.control.prepared`).

Two orders, both with one ``observe`` and one ``act`` per tick:

* at the joint state (default): ``observe`` the transition that ended now, then ``act`` on
  the measured observation -- the newest transition informs the action;
* ``act_ahead`` (a policy with :func:`~metarl_ros.control.policy_interface.ahead_parts`):
  ``act`` when the tick's reference arrives, on the observation the arm would have on it; at
  the joint state only a measured-state correction, if the policy has one, and the efforts
  are computed (by the loop); the transition is observed once the command is out
  (:meth:`PolicyCalls.finish`). The action's posterior is one transition older.

Policy calls hold :attr:`PolicyCalls.lock` (the context update may run on another thread).
Calls on the tick's path raise on a policy failure (the loop commands the safe action); the
transition handed over after the command reports its failure through ``on_error``.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from metarl_ros.control.joint_map import JointSample
from metarl_ros.control.law import ControlLaw, ReferenceTerms, build_observation, tracking_reward
from metarl_ros.control.measured import MeasuredObservation
from metarl_ros.control.policy_interface import AdaptivePolicy, ahead_parts
from metarl_ros.control.prepared import PreparedReferences, Reference

CheckAction = Callable[[np.ndarray], np.ndarray]
"""The loop's action check: returns the action clipped to [-1, 1], raises on a bad one."""


class PolicyCalls:
    """The policy's side of the control loop (module doc).

    Args:
        law: the control law the policy was trained with.
        policy: the controller.
        act_ahead: act when a tick's reference arrives, if the policy ``acts_on_reference``.
        on_transition: called after each transition handed to the policy.
        on_error: called with a description when handing over a transition after the command
            failed.
    """

    def __init__(self, law: ControlLaw, policy: AdaptivePolicy, act_ahead: bool,
                 on_transition: Callable[[], None], on_error: Callable[[str], None]) -> None:
        self.law = law
        self.policy = policy
        self.lock = threading.Lock()
        parts = ahead_parts(policy) if act_ahead else None
        self.act_ahead = parts is not None
        """acting when the reference arrives (asked for, and the policy's action, but for a
        correction on the measured state, reads the reference view only)."""
        self._act_on_view, self._correct = parts if parts is not None else (policy.act, None)
        self.prepared = PreparedReferences(law)
        self._on_transition = on_transition
        self._on_error = on_error
        self._previous: tuple[np.ndarray, np.ndarray] | None = None  # (obs, action) of the
        # last policy tick: the start of the next transition
        self._last_action = np.zeros(law.num_joints)
        self._version = 0  # changes with the policy state a prepared action depends on
        self._pending: tuple | None = None  # act_ahead: (sample, reference, terms, action,
        # MeasuredObservation or None) of the tick whose transition is not handed over yet

    def prepare(self, reference: Reference, check: CheckAction) -> float | None:
        """The work on ``reference`` that needs no joint state: its model terms and, with
        :attr:`act_ahead`, the action (after the last tick's transition). Returns the seconds
        spent acting (None if it did not act). A failure is left for the tick to meet again."""
        try:
            entry = self.prepared.entry(reference)
            if not self.act_ahead:
                return None
            self.finish()
            start = time.perf_counter()
            entry.action = self._act_on_reference(reference, entry.terms, check)
            entry.version = self._version
            return time.perf_counter() - start
        except Exception:  # noqa: BLE001 - the tick runs it again and fails safely
            return None

    def act(self, sample: JointSample, reference: Reference, check: CheckAction
            ) -> tuple[np.ndarray, ReferenceTerms, float | None]:
        """A tick's checked action for the joint state ``sample`` and its ``reference``, with
        the reference's model terms (for the efforts) and the seconds spent in the policy
        (None: prepared beforehand). Raises if the policy fails."""
        entry = self.prepared.entry(reference)
        terms = entry.terms
        if self.act_ahead:  # act, then hand the transition over once the command is out
            self.finish()
            applied = entry.action_for(self._version)
            acting = None
            if applied is None:  # not prepared (in time): now
                start = time.perf_counter()
                applied = self._act_on_reference(reference, terms, check)
                acting = time.perf_counter() - start
            measured = None
            if self._correct is not None:  # the measured state's part, on the tick's path:
                # it reads the tracking errors; the whole observation is built after the command
                measured = MeasuredObservation(self.law, sample.position, sample.velocity,
                                               reference, self._last_action, terms)
                with self.lock:
                    applied = check(self._correct(measured, applied))
            self._pending = (sample, reference, terms, applied, measured)
            return applied, terms, acting
        start = time.perf_counter()
        with self.lock:
            obs = build_observation(self.law, sample.position, sample.velocity, reference,
                                    self._last_action.astype(np.float32), terms)
            self._observe(obs, sample.position, reference)
            applied = check(self.policy.act(obs))
        acting = time.perf_counter() - start
        self._previous = (obs, applied)
        self._last_action = applied
        self._version += 1
        return applied, terms, acting

    def finish(self) -> None:
        """act_ahead: hand over the transition that ended at the last tick (its command is
        out); the policy state changes, and so does the version. Nothing pending: no-op."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        sample, reference, terms, applied, measured = pending
        try:
            with self.lock:
                if measured is not None:
                    obs = measured.observation()
                else:
                    obs = build_observation(self.law, sample.position, sample.velocity,
                                            reference, self._last_action.astype(np.float32),
                                            terms)
                self._observe(obs, sample.position, reference)
            self._previous = (obs, applied)
        except Exception as exc:  # noqa: BLE001 - the loop must survive any policy failure
            self._on_error(f"observe: {type(exc).__name__}: {exc}")
            self._previous = None
        self._last_action = applied
        self._version += 1

    def interrupt(self) -> None:
        """A safe command goes out instead of the policy's: the last policy tick's transition
        is still handed over, then no transition spans the gap and the next observation
        carries a zero action."""
        self.finish()
        self._previous = None  # a transition needs the policy's own action at both ends
        self._last_action = np.zeros(self.law.num_joints)
        self._version += 1

    def failed(self) -> None:
        """The tick's policy call raised: nothing of it is pending."""
        self._pending = None

    # ----------------------------------------------------------------- internals

    def _act_on_reference(self, reference: Reference, terms: ReferenceTerms,
                          check: CheckAction) -> np.ndarray:
        """The checked action on the observation the arm would have on its reference (the same
        action as on the measured one, for a policy that ``acts_on_reference``; before its
        correction, for one that splits)."""
        with self.lock:
            obs = build_observation(self.law, reference[0], reference[1], reference,
                                    self._last_action.astype(np.float32), terms)
            return check(self._act_on_view(obs))

    def _observe(self, obs: np.ndarray, position: np.ndarray, reference: Reference) -> None:
        """Hand over the transition that ends in ``obs`` (if one started at the previous
        tick). Under the lock."""
        if self._previous is None:
            return
        prev_obs, prev_action = self._previous
        error = float(np.linalg.norm(reference[0] - position))
        reward = tracking_reward(self.law, error, prev_action)
        self.policy.observe(prev_obs, prev_action.astype(np.float32), reward, obs)
        self._on_transition()
