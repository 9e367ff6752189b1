"""Rigid-body dynamics of the arm (Pinocchio), matching the PyBullet simulation.

:class:`RigidBodyModel` wraps a Pinocchio model of the robot's URDF with the vectors in the
robot's joint order (``RobotSpec.joint_names``, mapped by name), so that for joint positions
``q`` (rad), velocities ``qd`` (rad/s) and accelerations ``qdd`` (rad/s^2), all shape (n,)::

    M(q) qdd + C(q, qd) qd + g(q) = tau          (N*m)

Two details make it the *simulated* arm, not the URDF's:

* PyBullet's ``loadURDF`` (without ``URDF_USE_INERTIA_FROM_FILE``, as the simulator calls it)
  ignores the URDF's inertia tensors and derives rotational inertia from the collision meshes.
  ``inertia_source="simulator"`` reads those values back from PyBullet (masses and centres of
  mass are the URDF's either way); ``"urdf"`` keeps the file's tensors (a real robot's model).
  :meth:`RigidBodyModel.from_robot` takes them from a cached file next to the robot YAML
  (``sim/robots/<robot>_link_inertias.yaml``, :func:`link_inertias_file`) when there is one,
  so a robot computer without PyBullet (the deployed ``onnx_policy_node``, whose control law
  feeds the nominal model forward) builds the same model. Regenerate it after changing the
  robot's URDF with::

      python -m metarl_ros.control.rigid_body sim/robots/iiwa7.yaml

  (``test/test_rigid_body.py`` checks the shipped file against PyBullet.)
* The simulator adds each drive's armature ``J_a`` to the principal inertia of the link the
  joint moves, about all three axes (``localInertiaDiagonal += J_a``), not to the joint-space
  mass matrix diagonal as a rotor would. The model does exactly the same (``J_a * I3`` about
  the link's centre of mass), so off-diagonal terms of ``M`` carry it too.

Inertial parameters follow Pinocchio's ``Inertia.toDynamicParameters`` convention, in the
flange link's frame (the URDF link frame of ``RobotSpec.flange_link``) about its origin::

    pi = [m, m*c_x, m*c_y, m*c_z, I_xx, I_xy, I_yy, I_xz, I_yz, I_zz]   (kg, kg*m, kg*m^2)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import pinocchio as pin
import yaml

InertiaSource = Literal["simulator", "urdf"]
NUM_INERTIAL_PARAMETERS = 10
LINK_INERTIAS_SUFFIX = "_link_inertias.yaml"
REGENERATE_COMMAND = "python -m metarl_ros.control.rigid_body <robot.yaml>"


def resolve_urdf(urdf: str, robot_file: Path | None = None) -> Path:
    """The URDF file the simulator loads: relative to ``robot_file``'s folder, else
    pybullet_data's."""
    path = Path(urdf)
    if path.is_absolute():
        return path
    candidates = [robot_file.parent / path] if robot_file is not None else []
    import pybullet_data  # the URDFs ship with PyBullet; imported only for relative paths

    candidates.append(Path(pybullet_data.getDataPath()) / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"URDF {urdf!r} not found in " + ", ".join(map(str, candidates)))


def simulator_link_inertias(
    urdf_path: Path, link_names: Sequence[str] | None = None
) -> dict[str, pin.Inertia]:
    """Each link's inertia as PyBullet derives it (mass, centre of mass, mesh-based rotational
    inertia), in the link's URDF frame, by link name: the named links, or all of the URDF's
    (every joint's child link) for ``None``. Loads the URDF as the simulator does."""
    import pybullet  # only needed to mirror the simulator

    client = pybullet.connect(pybullet.DIRECT)
    try:
        body = pybullet.loadURDF(str(urdf_path), useFixedBase=True, physicsClientId=client)
        index = {
            pybullet.getJointInfo(body, i, physicsClientId=client)[12].decode(): i
            for i in range(pybullet.getNumJoints(body, physicsClientId=client))
        }
        inertias = {}
        for name in index if link_names is None else link_names:
            mass, _, diagonal, position, orientation = pybullet.getDynamicsInfo(
                body, index[name], physicsClientId=client
            )[:5]
            rotation = np.asarray(pybullet.getMatrixFromQuaternion(orientation)).reshape(3, 3)
            rotational = rotation @ np.diag(diagonal) @ rotation.T
            inertias[name] = pin.Inertia(float(mass), np.asarray(position, float), rotational)
        return inertias
    finally:
        pybullet.disconnect(client)


def link_inertias_file(robot_file: Path) -> Path:
    """The cached simulator link inertias of the robot YAML ``robot_file``:
    ``<folder>/<stem>_link_inertias.yaml``."""
    robot_file = Path(robot_file)
    return robot_file.with_name(robot_file.stem + LINK_INERTIAS_SUFFIX)


def write_link_inertias(path: Path, urdf: str, urdf_path: Path) -> None:
    """Write every link's :func:`simulator_link_inertias` of ``urdf_path`` (the robot YAML's
    ``urdf`` entry, resolved) to ``path``: per link ``mass`` (kg), ``com`` (m, shape (3,))
    and ``inertia`` (kg*m^2, 3x3, about the centre of mass), in the link's URDF frame."""
    links = {
        name: {
            "mass": float(inertia.mass),
            "com": np.asarray(inertia.lever, float).tolist(),
            "inertia": np.asarray(inertia.inertia, float).tolist(),
        }
        for name, inertia in simulator_link_inertias(urdf_path).items()
    }
    path = Path(path)
    robot_name = str(path.parent / path.name.removesuffix(LINK_INERTIAS_SUFFIX)) + ".yaml"
    header = (
        "# Link inertias as PyBullet derives them from the URDF (rotational inertia from the\n"
        "# collision meshes), for the nominal model without PyBullet\n"
        "# (metarl_ros/control/rigid_body.py). Generated, do not edit; regenerate with\n"
        f"#   {REGENERATE_COMMAND.replace('<robot.yaml>', robot_name)}\n"
        "# (the robot YAML next to this file; test/test_rigid_body.py checks it is current).\n"
    )
    text = yaml.safe_dump({"urdf": urdf, "links": links}, sort_keys=False,
                          default_flow_style=None, width=100)
    path.write_text(header + text)


def read_link_inertias(path: Path, urdf: str) -> dict[str, pin.Inertia]:
    """The link inertias :func:`write_link_inertias` cached in ``path``, by link name, checked
    to be for the robot YAML's ``urdf``."""
    data = yaml.safe_load(Path(path).read_text())
    cached = data.get("urdf") if isinstance(data, dict) else None
    if cached != urdf:
        raise ValueError(
            f"{path} caches the link inertias of {cached!r}, not of {urdf!r}: "
            f"regenerate it ({REGENERATE_COMMAND})"
        )
    inertias = {}
    for name, link in data["links"].items():
        rotational = np.asarray(link["inertia"], float)
        if rotational.shape != (3, 3) or len(link["com"]) != 3:
            raise ValueError(f"{path}: link {name!r} needs com (3,) and inertia (3, 3)")
        inertias[name] = pin.Inertia(float(link["mass"]), np.asarray(link["com"], float),
                                     rotational)
    return inertias


def point_mass_parameters(
    mass: float, offset: Sequence[float], radius: float = 0.0
) -> np.ndarray:
    """Dynamic parameters, shape (10,), of a solid sphere of ``mass`` kg and ``radius`` m (a
    point mass for 0) centred at ``offset`` (m, shape (3,)), about the frame origin."""
    inertia = pin.Inertia(
        float(mass), np.asarray(offset, float), np.eye(3) * 0.4 * float(mass) * radius**2
    )
    return np.asarray(inertia.toDynamicParameters(), dtype=np.float64)


class RigidBodyModel:
    """Dynamics of a fixed-base serial arm in the robot's joint order.

    Args:
        urdf_path: the URDF file.
        joint_names: the robot's joints, in the order of every (n,) vector here. Other movable
            joints of the URDF are locked at zero.
        flange_link: the link a payload is attached to.
        armature: kg*m^2 per joint, shape (n,), added as the simulator does (module doc).
        inertia_source: ``"simulator"`` or ``"urdf"`` rotational inertia (module doc).
        link_inertias: for ``"simulator"``, the links' simulator inertias by link name
            (:func:`read_link_inertias`); read from PyBullet when ``None``.
    """

    def __init__(
        self,
        urdf_path: str | Path,
        joint_names: Sequence[str],
        flange_link: str,
        armature: Sequence[float] | None = None,
        inertia_source: InertiaSource = "simulator",
        link_inertias: Mapping[str, pin.Inertia] | None = None,
    ) -> None:
        full = pin.buildModelFromUrdf(str(urdf_path))
        missing = [name for name in joint_names if not full.existJointName(name)]
        if missing:
            raise ValueError(f"joints {missing} not in {urdf_path}")
        others = [
            j for j in range(1, full.njoints)
            if full.names[j] not in joint_names and full.joints[j].nv > 0
        ]
        model = pin.buildReducedModel(full, others, pin.neutral(full)) if others else full
        if not model.existFrame(flange_link):
            raise ValueError(f"link {flange_link!r} not in {urdf_path}")
        ids = [model.getJointId(name) for name in joint_names]
        if any(model.joints[j].nq != 1 or model.joints[j].nv != 1 for j in ids):
            raise ValueError("only 1-DOF (revolute/prismatic) joints are supported")
        link_of_joint = self._link_names(model, ids)
        if inertia_source == "simulator":
            if link_inertias is None:
                link_inertias = simulator_link_inertias(Path(urdf_path), link_of_joint)
            missing = [name for name in link_of_joint if name not in link_inertias]
            if missing:
                raise ValueError(f"no simulator inertia for links {missing}")
            for j, name in zip(ids, link_of_joint):
                inertia = link_inertias[name]
                if not np.isclose(inertia.mass, model.inertias[j].mass):
                    raise ValueError(f"joint {model.names[j]!r}: fixed-joint links not supported")
                model.inertias[j] = inertia
        elif inertia_source != "urdf":
            raise ValueError(f"inertia_source must be 'simulator' or 'urdf', not {inertia_source}")
        armature = np.zeros(len(ids)) if armature is None else np.asarray(armature, float)
        if armature.shape != (len(ids),):
            raise ValueError(f"armature must have shape ({len(ids)},)")
        for j, rotor in zip(ids, armature):
            body = model.inertias[j]
            rotational = body.inertia + rotor * np.eye(3)
            model.inertias[j] = pin.Inertia(body.mass, body.lever, rotational)
        frame = model.frames[model.getFrameId(flange_link)]
        self._init_from(model, np.array([model.idx_vs[j] for j in ids]), frame.parentJoint,
                        frame.placement, tuple(joint_names))

    def _init_from(
        self, model: pin.Model, index: np.ndarray, flange_joint: int, flange_placement: pin.SE3,
        joint_names: tuple[str, ...],
    ) -> None:
        self._model, self._data = model, model.createData()
        self._index = index
        self._flange_joint = int(flange_joint)
        self._flange_placement = flange_placement
        self.joint_names = joint_names
        self.num_joints = len(joint_names)
        # Probe: the flange body alone, for the Slotine-Li payload regressor (by linearity).
        self._probe = pin.Model(model)
        for j in range(1, model.njoints):
            self._probe.inertias[j] = pin.Inertia.Zero()
        self._probe_data = self._probe.createData()
        reference = np.array([1.0, 0, 0, 0, 1.0, 0, 1.0, 0, 0, 1.0])
        self._basis = reference[:, None] + np.eye(NUM_INERTIAL_PARAMETERS)
        self._basis_inertias = [pin.Inertia.FromDynamicParameters(b) for b in self._basis.T]
        self._basis_inverse = np.linalg.inv(self._basis)

    @staticmethod
    def _link_names(model: pin.Model, ids: Sequence[int]) -> list[str]:
        names = []
        for j in ids:
            bodies = [f.name for f in model.frames if f.type == pin.BODY and f.parentJoint == j
                      and f.placement.isIdentity()]
            if not bodies:
                raise ValueError(f"joint {model.names[j]!r} has no child link at its frame")
            names.append(bodies[0])
        return names

    @classmethod
    def from_robot(
        cls, robot, robot_file: Path | None = None, inertia_source: InertiaSource = "simulator"
    ) -> "RigidBodyModel":
        """The model of a :class:`~metarl_ros.sim.robot.RobotSpec` (URDF resolved as the
        simulator does, ``robot_file`` being the robot YAML). The simulator's link inertias
        come from :func:`link_inertias_file` next to ``robot_file`` when it exists (no
        PyBullet needed), else from PyBullet."""
        link_inertias = None
        if inertia_source == "simulator" and robot_file is not None:
            cached = link_inertias_file(robot_file)
            if cached.is_file():
                link_inertias = read_link_inertias(cached, robot.urdf)
        return cls(
            resolve_urdf(robot.urdf, robot_file),
            robot.joint_names,
            robot.flange_link,
            robot.armature,
            inertia_source,
            link_inertias,
        )

    # ------------------------------------------------------------------ conversions

    def _pin(self, vector: np.ndarray) -> np.ndarray:
        out = np.zeros(self._model.nv)
        out[self._index] = vector
        return out

    def _ours(self, vector: np.ndarray) -> np.ndarray:
        return np.asarray(vector)[self._index].copy()

    def _ours_matrix(self, matrix: np.ndarray) -> np.ndarray:
        return np.asarray(matrix)[np.ix_(self._index, self._index)].copy()

    # ------------------------------------------------------------------ dynamics

    def mass_matrix(self, q: np.ndarray) -> np.ndarray:
        """Joint-space inertia ``M(q)``, shape (n, n), kg*m^2, symmetric positive definite."""
        upper = np.triu(pin.crba(self._model, self._data, self._pin(q)))
        return self._ours_matrix(upper + np.triu(upper, 1).T)

    def coriolis_matrix(self, q: np.ndarray, qd: np.ndarray) -> np.ndarray:
        """``C(q, qd)``, shape (n, n), N*m*s/rad, with ``dM/dt - 2C`` skew-symmetric."""
        return self._ours_matrix(
            pin.computeCoriolisMatrix(self._model, self._data, self._pin(q), self._pin(qd))
        )

    def coriolis(self, q: np.ndarray, qd: np.ndarray) -> np.ndarray:
        """Coriolis and centrifugal torque ``C(q, qd) qd``, shape (n,), N*m."""
        return self.inverse_dynamics(q, qd, np.zeros(self.num_joints)) - self.gravity(q)

    def gravity(self, q: np.ndarray) -> np.ndarray:
        """Gravity torque ``g(q)``, shape (n,), N*m (what the motors must apply to hold)."""
        return self._ours(
            pin.computeGeneralizedGravity(self._model, self._data, self._pin(q))
        )

    def inverse_dynamics(self, q: np.ndarray, qd: np.ndarray, qdd: np.ndarray) -> np.ndarray:
        """``M qdd + C qd + g``, shape (n,), N*m (recursive Newton-Euler)."""
        return self._ours(
            pin.rnea(self._model, self._data, self._pin(q), self._pin(qd), self._pin(qdd))
        )

    def forward_dynamics(self, q: np.ndarray, qd: np.ndarray, tau: np.ndarray) -> np.ndarray:
        """Joint accelerations ``qdd`` (rad/s^2, shape (n,)) under joint torques ``tau``."""
        return self._ours(
            pin.aba(self._model, self._data, self._pin(q), self._pin(qd), self._pin(tau))
        )

    def slotine_li_torque(
        self, q: np.ndarray, qd: np.ndarray, qd_r: np.ndarray, qdd_r: np.ndarray
    ) -> np.ndarray:
        """``M(q) qdd_r + C(q, qd) qd_r + g(q)``, shape (n,), N*m (Slotine-Li form)."""
        return self.inverse_dynamics(q, np.zeros(self.num_joints), qdd_r) + (
            self.coriolis_matrix(q, qd) @ qd_r
        )

    # ------------------------------------------------------------------ payload

    def flange_parameters(self) -> np.ndarray:
        """The flange link's dynamic parameters, shape (10,) (convention: module doc)."""
        placement = self._flange_placement.inverse()
        return np.asarray(
            placement.act(self._model.inertias[self._flange_joint]).toDynamicParameters()
        )

    def payload_regressor(
        self, q: np.ndarray, qd: np.ndarray, qd_r: np.ndarray | None, qdd_r: np.ndarray
    ) -> np.ndarray:
        """``Y``, shape (n, 10): the torque of extra flange parameters ``dpi`` is ``Y @ dpi``.

        With ``qd_r=None``: ``Y(q, qd, qdd_r)``, the flange link's columns of Pinocchio's joint
        torque regressor (``M qdd_r + C qd + g``). With ``qd_r``: the Slotine-Li regressor of
        ``M qdd_r + C(q, qd) qd_r + g``, computed from the flange body alone by linearity.
        """
        if qd_r is None:
            full = pin.computeJointTorqueRegressor(
                self._model, self._data, self._pin(q), self._pin(qd), self._pin(qdd_r)
            )
            start = NUM_INERTIAL_PARAMETERS * (self._flange_joint - 1)
            columns = full[:, start : start + NUM_INERTIAL_PARAMETERS]
        else:
            qp, qdp = self._pin(q), self._pin(qd)
            zero, qd_rp, qdd_rp = np.zeros(self._model.nv), self._pin(qd_r), self._pin(qdd_r)
            probe, data = self._probe, self._probe_data
            responses = np.empty((self._model.nv, NUM_INERTIAL_PARAMETERS))
            for k, inertia in enumerate(self._basis_inertias):
                probe.inertias[self._flange_joint] = inertia
                responses[:, k] = pin.rnea(probe, data, qp, zero, qdd_rp) + (
                    pin.computeCoriolisMatrix(probe, data, qp, qdp) @ qd_rp
                )
            columns = responses @ self._basis_inverse
        # Columns are for parameters in the joint frame; map to the flange link's frame.
        return self._ours_matrix_rows(columns @ self._flange_to_joint_parameters())

    def _ours_matrix_rows(self, matrix: np.ndarray) -> np.ndarray:
        return np.asarray(matrix)[self._index].copy()

    def _flange_to_joint_parameters(self) -> np.ndarray:
        """(10, 10) linear map from flange-frame to joint-frame dynamic parameters."""
        if self._flange_placement.isIdentity():
            return np.eye(NUM_INERTIAL_PARAMETERS)
        return np.column_stack(
            [
                np.asarray(self._flange_placement.act(pin.Inertia.FromDynamicParameters(b))
                           .toDynamicParameters())
                for b in self._basis.T
            ]
        ) @ self._basis_inverse

    def with_payload(self, mass: float, offset: Sequence[float], radius: float = 0.0
                     ) -> "RigidBodyModel":
        """A copy whose flange link also carries a solid sphere of ``mass`` kg and ``radius`` m
        (0: a point mass) centred at ``offset`` (m, shape (3,), flange frame)."""
        if mass < 0:
            raise ValueError(f"payload mass must be >= 0, got {mass}")
        model = pin.Model(self._model)
        payload = pin.Inertia(
            float(mass), np.asarray(offset, float), np.eye(3) * 0.4 * float(mass) * radius**2
        )
        body = self._flange_joint
        model.inertias[body] = model.inertias[body] + self._flange_placement.act(payload)
        copy = object.__new__(RigidBodyModel)
        copy._init_from(model, self._index, body, self._flange_placement, self.joint_names)
        return copy


class NominalFeedForward:
    """The nominal arm's inverse dynamics along the reference, without gravity:
    ``M(q_ref) qdd_ref + C(q_ref, qd_ref) qd_ref`` (N*m, (n,)), for a robot whose firmware
    compensates gravity itself. Told nothing about faults: what a model-based controller that
    does not adapt feeds forward."""

    def __init__(self, model: RigidBodyModel) -> None:
        self.model = model

    def __call__(self, q_ref: np.ndarray, qd_ref: np.ndarray, qdd_ref: np.ndarray) -> np.ndarray:
        q_ref = np.asarray(q_ref, dtype=np.float64)
        return (self.model.inverse_dynamics(q_ref, np.asarray(qd_ref, np.float64),
                                            np.asarray(qdd_ref, np.float64))
                - self.model.gravity(q_ref))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m metarl_ros.control.rigid_body ROBOT_YAML...``: (re)write each robot's
    :func:`link_inertias_file` from PyBullet."""
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        raise SystemExit(f"usage: {REGENERATE_COMMAND}")
    for robot_file in map(Path, paths):
        urdf = yaml.safe_load(robot_file.read_text())["urdf"]
        target = link_inertias_file(robot_file)
        write_link_inertias(target, urdf, resolve_urdf(urdf, robot_file))
        print(target)


if __name__ == "__main__":
    main()
