"""mmpipe: a batch data-and-training pipeline for image + text (+ audio) collections."""

import os

# Bit-reproducible training on one machine needs oneMKL to keep its thread count per call:
# with MKL_DYNAMIC (on by default) it may use fewer threads when the machine is busy, which
# changes the order of float reductions (oneMKL's conditional numerical reproducibility
# requires it off). Set before torch loads MKL; an explicit MKL_DYNAMIC still wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
