"""The paper's transfer results (Appendix B, Table 11): Net-D & Net-E, descriptors of the
two nets' penultimate layers combined, linear SVM. Percent: mAP on VOC, mean class recall
on Caltech (averaged over the paper's random splits)."""

from __future__ import annotations

# data set -> (metric, value %, the protocol in the paper's words).
NET_D_AND_E = {
    "VOC-2007": ("mAP", 89.7, "Q in {256, 384, 512}, averaged over scales"),
    "VOC-2012": ("mAP", 89.3, "Q in {256, 384, 512}, averaged over scales"),
    "Caltech-101": ("mean class recall", 92.7, "Q in {256, 384, 512}, stacked; 30 training "
                    "images per class"),
    "Caltech-256": ("mean class recall", 86.2, "Q in {256, 384, 512}, stacked; 60 training "
                    "images per class"),
}
# Names a data set goes by in our configs (TFDS names, lower case) -> the paper's.
_ALIASES = {"voc/2007": "VOC-2007", "voc2007": "VOC-2007", "voc/2012": "VOC-2012",
            "voc2012": "VOC-2012", "caltech101": "Caltech-101", "caltech_101": "Caltech-101",
            "caltech256": "Caltech-256", "caltech_256": "Caltech-256"}


def paper_data_set(name: str) -> str | None:
    """The paper's name of a data set, or None when the paper did not report it.

    Args:
      name: config.data.name (e.g. "caltech101", "voc/2007").

    Returns:
      A key of NET_D_AND_E, or None.
    """
    return _ALIASES.get(str(name).lower())
