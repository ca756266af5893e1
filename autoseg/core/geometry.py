"""The geometry record that travels beside every array and is restored on output.

Array axis order throughout autoseg is SimpleITK/numpy order ``(z, y, x)``, i.e. the
reverse of the file's voxel index order ``(i, j, k)``; spacing is given in that same
order. Origin and direction are kept in ITK's physical LPS convention so images read
by nibabel and by SimpleITK compare equal. For NIfTI input the original header is
kept verbatim (base64) so a prediction carries the same affine, qform/sform codes and
units as its input.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: Physical tolerance when comparing geometries of the channels and label of one case.
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


@dataclass(frozen=True)
class Geometry:
    """Shape and placement in the world of one image, in array order ``(z, y, x)``."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    nifti_header: str | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Geometry:
        return cls(
            shape=tuple(int(s) for s in data["shape"]),
            spacing=tuple(float(s) for s in data["spacing"]),
            origin=tuple(float(o) for o in data["origin"]),
            direction=tuple(float(d) for d in data["direction"]),
            nifti_header=data.get("nifti_header"),
        )

    def mismatches(self, other: Geometry) -> list[str]:
        """Describe every way ``other`` does not sit on the same voxel grid as ``self``."""
        problems = []
        if tuple(self.shape) != tuple(other.shape):
            problems.append(f"shape {_fmt(self.shape)} vs {_fmt(other.shape)}")
            return problems
        if not np.allclose(self.spacing, other.spacing, rtol=SPACING_RTOL, atol=0):
            problems.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}")
        if not np.allclose(self.origin, other.origin, rtol=0, atol=ORIGIN_ATOL_MM):
            problems.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=DIRECTION_ATOL):
            problems.append("direction (orientation) differs")
        return problems


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """One voxel's volume in millilitres (spacing in mm): what volumes per structure are counted in."""
    return float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


def orientation_code(geometry: Geometry) -> str:
    """Anatomical direction (RAS letters, as nibabel's ``aff2axcodes``) of the file's voxel axes i, j, k."""
    lps = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    ras = np.diag([-1.0, -1.0, 1.0]) @ lps
    letters = ("RL", "AP", "SI")
    code = ""
    for column in ras.T:
        axis = int(np.argmax(np.abs(column)))
        code += letters[axis][0 if column[axis] > 0 else 1]
    return code


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values) + ")"


def encode_header(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_header(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))
