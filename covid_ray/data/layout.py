"""Names and counts of the COVID-19 Radiography Database, shared by scan and synth.

The Kaggle archive unpacks to ``COVID-19_Radiography_Dataset/`` with one folder per
class (``Viral Pneumonia`` has a space), each holding ``images/*.png`` (299x299) and
``masks/*.png`` (256x256 lung masks), plus ``<class>.metadata.xlsx`` files and
``README.md.txt`` at the root.
"""
from __future__ import annotations

KAGGLE_DIRNAME = "COVID-19_Radiography_Dataset"

# Output order of every model and table when the four Kaggle classes are present.
KAGGLE_CLASSES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")

# Image counts of the released database; the synthetic default keeps these proportions.
KAGGLE_COUNTS: dict[str, int] = {
    "COVID": 3616,
    "Lung_Opacity": 6012,
    "Normal": 10192,
    "Viral Pneumonia": 1345,
}

KAGGLE_IMAGE_SIZE = 299
KAGGLE_MASK_SIZE = 256

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Written at the root of a synthetic dataset; its presence marks every artefact built
# from the folder as synthetic.
SYNTHETIC_MARKER = "SYNTHETIC.json"
