"""Sensor sizes of common drone cameras by EXIF model, for frames without a 35 mm equivalent."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sensor:
    width_mm: float
    height_mm: float
    name: str


# Nominal active areas of the optical format types as published on the makers' spec sheets.
_ONE_INCH = (13.2, 8.8)  # 1-inch type
_FOUR_THIRDS = (17.3, 13.0)  # Four Thirds / Micro Four Thirds
_HALF_INCH = (6.4, 4.8)  # 1/2-inch type
_ONE_OVER_2_3 = (6.17, 4.55)  # 1/2.3-inch type

# EXIF Model -> (format, product); each product's spec sheet (dji.com) states the format.
_MODELS: dict[str, tuple[tuple[float, float], str]] = {
    "FC6310": (_ONE_INCH, "Phantom 4 Pro"),  # spec sheet: 1" CMOS, 20 MP
    "FC6310S": (_ONE_INCH, "Phantom 4 Pro V2.0"),  # spec sheet: 1" CMOS, 20 MP
    "FC6310R": (_ONE_INCH, "Phantom 4 RTK"),  # spec sheet: 1" CMOS, 20 MP
    "L1D-20C": (_ONE_INCH, "Mavic 2 Pro"),  # spec sheet: 1" CMOS (Hasselblad L1D-20c)
    "FC3411": (_ONE_INCH, "Air 2S"),  # spec sheet: 1" CMOS, 20 MP
    "FC6510": (_ONE_INCH, "Zenmuse X4S"),  # spec sheet: 1" CMOS, 20 MP
    "FC6520": (_FOUR_THIRDS, "Zenmuse X5S"),  # spec sheet: Micro 4/3 sensor, 20.8 MP
    "L2D-20C": (_FOUR_THIRDS, "Mavic 3"),  # spec sheet: 4/3 CMOS (Hasselblad L2D-20c)
    "M3E": (_FOUR_THIRDS, "Mavic 3 Enterprise"),  # spec sheet: wide camera 4/3 CMOS, 20 MP
    "FC3170": (_HALF_INCH, "Mavic Air 2"),  # spec sheet: 1/2" CMOS, 48 MP
    "FC220": (_ONE_OVER_2_3, "Mavic Pro"),  # spec sheet: 1/2.3" CMOS, 12.35 MP
    "FC330": (_ONE_OVER_2_3, "Phantom 4"),  # spec sheet: 1/2.3" CMOS, 12.4 MP
    "FC2103": (_ONE_OVER_2_3, "Mavic Air"),  # spec sheet: 1/2.3" CMOS, 12 MP
    "FC2204": (_ONE_OVER_2_3, "Mavic 2 Zoom"),  # spec sheet: 1/2.3" CMOS, 12 MP
    "FC7203": (_ONE_OVER_2_3, "Mavic Mini"),  # spec sheet: 1/2.3" CMOS, 12 MP
    "FC7303": (_ONE_OVER_2_3, "Mini 2"),  # spec sheet: 1/2.3" CMOS, 12 MP
}


def sensor_for(model: object) -> Sensor | None:
    """The sensor of a known camera model (EXIF Model, case and spaces ignored), else None."""
    if not isinstance(model, str):
        return None
    found = _MODELS.get(model.strip().upper())
    if found is None:
        return None
    (width, height), name = found
    return Sensor(width_mm=width, height_mm=height, name=name)
