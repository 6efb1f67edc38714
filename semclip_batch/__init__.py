"""semclip-batch: distributed SEM-CLIP defect segmentation and classification over archived SEM lots."""

__version__ = "0.1.0"
