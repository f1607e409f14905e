"""Scoring: voxel overlap per case and LUNA16 lesion-level FROC / CPM.

overlap -- Dice, IoU, HD95, surface Dice (MONAI); pooled Dice of masks
luna16  -- candidates matched to nodules, FROC, CPM, bootstrap intervals
scoring -- one test split scored the same way in evaluate and quantize
"""
