"""Series of a DICOM study are mapped to a model's channels by their descriptions, or refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoseg.core.errors import DatasetError
from autoseg.data.io.dicom_study import map_series_to_channels, sequence_key
from autoseg.phantoms import synthetic

MSD_BRAIN_CHANNELS = ("FLAIR", "T1w", "t1gd", "T2w")  # a BraTS-style model, channels in MSD order


def write_study(case: Path, descriptions: dict[str, str]) -> Path:
    """One tiny series per subfolder, with the given SeriesDescription."""
    for i, (folder, description) in enumerate(descriptions.items()):
        synthetic.write_dicom_series(
            np.zeros((2, 4, 4)),
            (2.0, 1.0, 1.0),
            case / folder,
            series_uid=f"1.2.826.0.1.3680043.2.1125.7.{i + 1}",
            description=description,
        )
    return case


@pytest.mark.parametrize(
    "description,key",
    [
        ("AX T2 FLAIR", "FLAIR"),
        ("t2_tirm_tra_dark-fluid", "FLAIR"),
        ("Sag 3D FLAIR", "FLAIR"),
        ("t1_mprage_sag_p2_iso", "T1"),
        ("SAG T1 PRE", "T1"),
        ("T1W_3D_TFE", "T1"),
        ("T1 MPRAGE POST GD", "T1ce"),
        ("AX T1 +C", "T1ce"),
        ("T1W_3D_TFE_GADO", "T1ce"),
        ("t1c", "T1ce"),
        ("AX T2 TSE", "T2"),
        ("T2W", "T2"),
        ("AX T2*", None),
        ("DWI b1000", None),
        ("LOCALIZER", None),
        ("MPRAGE", None),
        ("T1 T2 fusion", None),
    ],
)
def test_sequence_key(description: str, key: str | None) -> None:
    assert sequence_key(description) == key


def test_brain_study_is_mapped_in_channel_order_and_extra_series_are_left_out(tmp_path: Path) -> None:
    case = write_study(
        tmp_path / "PAT01",
        {
            "s1": "T1 MPRAGE POST GD",
            "s2": "AX T2 TSE",
            "s3": "LOCALIZER",
            "s4": "AX T2 FLAIR",
            "s5": "T1 MPRAGE",
        },
    )
    folders = map_series_to_channels(case, MSD_BRAIN_CHANNELS)
    assert [f.name for f in folders] == ["s4", "s5", "s1", "s2"]


def test_two_series_of_one_sequence_are_ambiguous(tmp_path: Path) -> None:
    case = write_study(
        tmp_path / "PAT02",
        {
            "a": "AX FLAIR",
            "b": "T1 AX",
            "c": "T1 SAG",
            "d": "T1 POST",
            "e": "T2",
        },
    )
    with pytest.raises(DatasetError, match=r"case PAT02: channel 'T1w' is ambiguous, b \('T1 AX'\), c \('T1 SAG'\)"):
        map_series_to_channels(case, MSD_BRAIN_CHANNELS)


def test_missing_sequence_names_the_channel_and_lists_the_series(tmp_path: Path) -> None:
    case = write_study(tmp_path / "PAT03", {"a": "AX FLAIR", "b": "T1", "c": "T1 POST", "d": "DWI"})
    with pytest.raises(DatasetError, match=r"no series matches channel 'T2w' \(series: a \('AX FLAIR'\), b"):
        map_series_to_channels(case, MSD_BRAIN_CHANNELS)


def test_other_models_match_channel_words(tmp_path: Path) -> None:
    case = write_study(tmp_path / "PAT04", {"x": "ADC map", "y": "T2W TSE AX", "z": "Survey"})
    assert [f.name for f in map_series_to_channels(case, ("T2W", "ADC"))] == ["y", "x"]
    with pytest.raises(DatasetError, match="no series matches channel 'DWI'"):
        map_series_to_channels(case, ("T2W", "DWI"))


def test_one_channel_one_series_needs_no_description(tmp_path: Path) -> None:
    case = write_study(tmp_path / "PAT05", {"only": ""})
    assert map_series_to_channels(case, ("CT",)) == (case / "only",)
    with pytest.raises(DatasetError, match="no DICOM series"):
        map_series_to_channels(tmp_path / "PAT05" / "only", ("CT",))


def test_one_series_cannot_feed_two_channels(tmp_path: Path) -> None:
    case = write_study(tmp_path / "PAT06", {"p": "T1 post", "q": "T2"})
    with pytest.raises(DatasetError, match=r"series p matches several channels \(T1, T1 post\)"):
        map_series_to_channels(case, ("T1", "T1 post"))
