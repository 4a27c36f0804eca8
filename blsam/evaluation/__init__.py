"""Zero-shot evaluation of SAM-style models (paper §4.4, Table 2): point/box mIoU on LVIS and
detector-prompted instance segmentation AP on COCO/LVIS."""
