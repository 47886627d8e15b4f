"""A frame's pinhole camera from EXIF and DJI XMP, with its assumptions, or why there is none."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service.geo.sensors import sensor_for

Coordinate = TypeVar("Coordinate", float, np.ndarray)  # one point, or arrays of them

FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
RTK_FIXED = 50  # DJI RtkFlag: 0 none, 16 single point, 34 float, 50 fixed

# 1-sigma error sources, stated on every located frame.
SIGMA_GNSS_M = 2.5  # consumer GNSS, horizontal
SIGMA_GNSS_RTK_M = 0.05  # RTK fixed, horizontal
SIGMA_HEIGHT_M = 1.5  # barometric height above take-off, and ground that is not quite flat
SIGMA_HEIGHT_ABSOLUTE_M = 3.0  # GNSS altitude against a given ground elevation
SIGMA_HEIGHT_RTK_M = 0.5  # RTK altitude: what is left is the ground not being flat
SIGMA_ATTITUDE_DEG = 1.0  # gimbal yaw, pitch and roll, each

# Camera axes (x right, y down, z forward) -> body axes (forward, right, down); NED -> ENU.
_BODY_FROM_CAMERA = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
_ENU_FROM_NED = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


@dataclass(frozen=True)
class Unlocated:
    """A frame that cannot be placed on the ground, and why."""

    reason: str
    assumptions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Camera:
    """A pinhole camera over flat ground.

    Intrinsics (fx, fy, cx, cy) are in pixels of the sensor image as the file stores it,
    `sensor_width` x `sensor_height`; the job's pixels are of the upright image (EXIF
    `orientation` applied), mapped back with `to_sensor`. The pose is DJI's: yaw degrees
    clockwise from true north, pitch 0 at the horizon and -90 straight down, roll positive with
    the right side down. `height_m` is the camera above the ground plane; `ground_altitude_m`
    that plane's height, used as the origin of the local east-north-up frame."""

    lat: float
    lon: float
    height_m: float
    ground_altitude_m: float
    yaw: float
    pitch: float
    roll: float
    fx: float
    fy: float
    cx: float
    cy: float
    sensor_width: int
    sensor_height: int
    orientation: int = 1
    focal_mm: float | None = None
    sensor_width_mm: float | None = None
    model: str | None = None
    assumptions: tuple[str, ...] = ()
    sigma_position_m: float = SIGMA_GNSS_M
    sigma_height_m: float = SIGMA_HEIGHT_M
    sigma_attitude_deg: float = SIGMA_ATTITUDE_DEG

    @property
    def image_size(self) -> tuple[int, int]:
        """Width and height of the upright image."""
        if self.orientation >= 5:
            return self.sensor_height, self.sensor_width
        return self.sensor_width, self.sensor_height

    def to_sensor(self, x: Coordinate, y: Coordinate) -> tuple[Coordinate, Coordinate]:
        """A point (or arrays of points) of the upright image in sensor pixels (undoing EXIF
        orientation 1..8)."""
        w, h = self.sensor_width, self.sensor_height
        return {
            1: (x, y),
            2: (w - x, y),
            3: (w - x, h - y),
            4: (x, h - y),
            5: (y, x),
            6: (y, h - x),
            7: (w - y, h - x),
            8: (w - y, x),
        }.get(self.orientation, (x, y))

    def rotation(self) -> np.ndarray:
        """The matrix taking camera-frame vectors to local east-north-up."""
        yaw, pitch, roll = (math.radians(a) for a in (self.yaw, self.pitch, self.roll))
        cz, sz = math.cos(yaw), math.sin(yaw)
        cy, sy = math.cos(pitch), math.sin(pitch)
        cx, sx = math.cos(roll), math.sin(roll)
        about_down = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
        about_right = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
        about_forward = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
        return _ENU_FROM_NED @ about_down @ about_right @ about_forward @ _BODY_FROM_CAMERA

    def ray(self, x: float, y: float, rotation: np.ndarray | None = None) -> np.ndarray:
        """The east-north-up direction (unit) of the ray through a point of the upright image
        (`rotation`: instead of the camera's own, e.g. a perturbed one)."""
        u, v = self.to_sensor(x, y)
        turn = self.rotation() if rotation is None else rotation
        direction = turn @ np.array([(u - self.cx) / self.fx, (v - self.cy) / self.fy, 1])
        result: np.ndarray = direction / np.linalg.norm(direction)
        return result


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _positive(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and number > 0 else None


def _intrinsics(
    exif: dict[str, Any], dji: dict[str, Any], sw: int, sh: int, said: list[str]
) -> tuple[float, float, float, float | None] | str:
    """(focal px, cx, cy, sensor width mm) for the sensor image, or why there is none."""
    focal_mm = _positive(exif.get("focal_length"))
    centre_x, centre_y = sw / 2, sh / 2
    calibrated = _positive(dji.get("calibrated_focal_length"))
    if calibrated is not None:
        ccx = _positive(dji.get("calibrated_optical_center_x"))
        ccy = _positive(dji.get("calibrated_optical_center_y"))
        scale = sw / (2 * ccx) if ccx else 0.0
        if 0.9 < scale < 1.1:  # an optical centre off the middle, not a resized image
            scale = 1.0
        if ccx and ccy and 0.1 < scale < 10 and abs(scale / (sh / (2 * ccy)) - 1) < 0.1:
            focal, centre_x, centre_y = calibrated * scale, ccx * scale, ccy * scale
            said.append("focal length and optical centre from the DJI calibration")
            if abs(scale - 1) > 0.01:
                said.append(f"calibration scaled by {scale:.3g} to the image size (resized)")
        else:
            focal = calibrated
            said.append("focal length from the DJI calibration, optical centre at the image centre")
        width_mm = focal_mm * sw / focal if focal_mm else None
        return focal, centre_x, centre_y, width_mm
    said.append("optical centre at the image centre")
    focal_35 = _positive(exif.get("focal_length_35mm"))
    if focal_35 is not None:
        said.append("sensor width from the 35 mm equivalent focal length (diagonal field of view)")
        focal = focal_35 * math.hypot(sw, sh) / FULL_FRAME_DIAGONAL_MM
        width_mm = focal_mm * sw / focal if focal_mm else None
        return focal, centre_x, centre_y, width_mm
    sensor = sensor_for(exif.get("model"))
    if focal_mm is not None and sensor is not None:
        # The image is the largest part of the sensor with its own aspect ratio.
        width_mm = min(sensor.width_mm, sensor.height_mm * sw / sh)
        said.append(
            f"sensor {sensor.width_mm:g} x {sensor.height_mm:g} mm from the {sensor.name} "
            "spec sheet, the image using its largest area of the image's aspect ratio"
        )
        return focal_mm * sw / width_mm, centre_x, centre_y, width_mm
    if focal_mm is None:
        return "no focal length in EXIF (neither focal length nor 35 mm equivalent)"
    return (
        "no 35 mm equivalent focal length in EXIF and the camera model "
        f"{str(exif.get('model') or '(none)')[:40]!r} is not in the sensor table"
    )


def camera_from_exif(
    exif: Any, width: Any, height: Any, *, ground_elevation: Any = None
) -> Camera | Unlocated:
    """The camera of a frame whose upright image is `width` x `height`, from the job's stored EXIF
    (service.intake: read_exif plus "dji" from read_dji_xmp); never raises on odd values."""
    said: list[str] = ["pinhole camera with square pixels and no lens distortion"]

    def refuse(reason: str) -> Unlocated:
        return Unlocated(reason, tuple(said))

    if not isinstance(exif, dict):
        return refuse("no EXIF metadata")
    w, h = _positive(width), _positive(height)
    if w is None or h is None:
        return refuse("the image size is not known")
    gps = _mapping(exif.get("gps"))
    lat, lon = _number(gps.get("latitude")), _number(gps.get("longitude"))
    if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 180:
        return refuse("no GPS position in EXIF")
    dji = _mapping(exif.get("dji"))
    orientation = exif.get("orientation")
    if not (isinstance(orientation, int) and 1 <= orientation <= 8):
        orientation = 1
    sw, sh = (round(h), round(w)) if orientation >= 5 else (round(w), round(h))
    if orientation != 1:
        said.append(f"EXIF orientation {orientation} undone to reach the sensor's pixels")

    pitch = _number(dji.get("gimbal_pitch"))
    if pitch is None or abs(pitch) > 180:
        return refuse("no camera attitude: no gimbal pitch in the DJI XMP metadata")
    yaw = _number(dji.get("gimbal_yaw"))
    if yaw is None:
        yaw = _number(dji.get("flight_yaw"))
        if yaw is None:
            return refuse("no camera heading: no gimbal or flight yaw in the DJI XMP metadata")
        said.append("camera heading taken from the aircraft's heading (no gimbal yaw)")
    else:
        said.append("gimbal yaw taken as the camera's heading from true north")
    roll = _number(dji.get("gimbal_roll"))
    if roll is None:
        roll = 0.0
        said.append("gimbal roll taken as level (no gimbal roll)")

    intrinsics = _intrinsics(exif, dji, sw, sh, said)
    if isinstance(intrinsics, str):
        return refuse(intrinsics)
    focal, cx, cy, width_mm = intrinsics

    rtk = dji.get("rtk_flag") == RTK_FIXED
    relative = _number(dji.get("relative_altitude"))
    absolute = _number(dji.get("absolute_altitude"))
    if absolute is None and _number(gps.get("altitude")) is not None:
        absolute = _number(gps.get("altitude"))
        from_gps = True
    else:
        from_gps = False
    if ground_elevation is not None:
        ground = _number(ground_elevation)
        if ground is None:
            return refuse("the given ground elevation is not a number")
        if absolute is None:
            return refuse("a ground elevation was given but the frame has no absolute altitude")
        height_m = absolute - ground
        said.append(f"flat ground at the given elevation, {ground:g} m above sea level")
        if from_gps:
            said.append("the EXIF GPS altitude taken as the camera's altitude above sea level")
        sigma_height = SIGMA_HEIGHT_RTK_M if rtk else SIGMA_HEIGHT_ABSOLUTE_M
    else:
        if relative is None:
            return refuse("no height above the ground: no relative altitude in the DJI XMP")
        height_m = relative
        ground = absolute - relative if absolute is not None else 0.0
        said.append("flat ground at take-off height")
        sigma_height = SIGMA_HEIGHT_RTK_M if rtk else SIGMA_HEIGHT_M
    if not height_m > 0:
        return refuse(f"the camera is not above the ground (height {height_m:.1f} m)")
    if not -1000 < ground < 10000:  # only the local frame's origin: a nonsense altitude is ignored
        ground = 0.0
    sigma_position = SIGMA_GNSS_RTK_M if rtk else SIGMA_GNSS_M
    if rtk:
        said.append("RTK fixed position (DJI RtkFlag 50)")
    said.append(
        f"1-sigma errors: position {sigma_position:g} m, height {sigma_height:g} m, "
        f"attitude {SIGMA_ATTITUDE_DEG:g}° per axis"
    )
    model = exif.get("model")
    return Camera(
        lat=lat,
        lon=lon,
        height_m=height_m,
        ground_altitude_m=ground,
        yaw=yaw,
        pitch=pitch,
        roll=roll,
        fx=focal,
        fy=focal,
        cx=cx,
        cy=cy,
        sensor_width=sw,
        sensor_height=sh,
        orientation=orientation,
        focal_mm=_positive(exif.get("focal_length")),
        sensor_width_mm=width_mm,
        model=model[:80] if isinstance(model, str) else None,
        assumptions=tuple(said),
        sigma_position_m=sigma_position,
        sigma_height_m=sigma_height,
    )
