"""Training sources beside SA-1B: COCO / LVIS instance files, folders of plain images, and
weighted mixtures of any of them (docs/training.md, "Your own data"). Every source yields
``SA1BDataset``'s samples, so the loop, prompts and losses are the same for all."""
