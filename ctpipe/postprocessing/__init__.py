"""From a probability map to nodules: the post-processing the pipeline chooses on validation.

candidates -- connected components, their scores, the mask they keep, detections
choose     -- the sweep on validation that picks the thresholds and the shape weight
"""
