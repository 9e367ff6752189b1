"""``metarl demo`` (what ``make demo`` runs): the shipped model through a fault scenario.

By default the run goes through the ROS 2 node graph ``adapt_sim`` (sim_node + adapter_node,
the same description and runner as ``metarl launch adapt_sim``) in lockstep, headless, once per
controller: the PD feedback alone; PEARL with adaptation off (latent held at the prior); PEARL
with adaptation on (the context posterior); and PEARL + MAML (posterior and the MAML dynamics
correction, stepped inline every ``adapt_every`` transitions in lockstep). A monitor
node beside the graph computes the tracking error from ``/joint_states`` and ``/reference``.
The demo prints the error before the faults, right after each one and once adapted, and
writes ``summary.json`` and ``tracking_error.png``. ``--no-ros`` runs the Gymnasium env
directly instead (a cross-check: in lockstep both give the same numbers).

Modules: :mod:`~metarl_ros.demo.command` (entry point), :mod:`~metarl_ros.demo.ros_run` (one
run through the graph), :mod:`~metarl_ros.demo.direct_run` (one run on the env),
:mod:`~metarl_ros.evaluation.trace` (what a run records), :mod:`~metarl_ros.demo.report` (metric,
table, JSON, plot).
"""

from metarl_ros.demo.command import demo_command

__all__ = ["demo_command"]
