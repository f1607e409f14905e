"""The 2.5D network and what feeds it.

nets   -- the MONAI BasicUNet, checkpoints, memory format
data   -- preprocessed cases on disk, 2.5D patch sampling and augmentation for training
views  -- axial / coronal / sagittal views, slabs, test-time mirroring (numpy only)
infer  -- inference over whole volumes: each slab in one pass, or in sliding windows
"""
