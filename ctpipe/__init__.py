"""ctpipe: a reproducible DVC pipeline for lung-nodule segmentation and detection on chest CT.

Modules, one concern each:
    params    -- reading a stage's section of params.yaml
    fileio    -- atomic writes of JSON, CSV, numpy arrays
    geometry  -- world (LPS mm) <-> voxel index conversion, the only place it is done
    synth     -- the deterministic synthetic chest-CT cohort, written as DICOM with realistic PHI
    dicomio   -- scanning a folder of DICOM files, grouping series, checking and reading them
    deid      -- de-identification to DICOM PS3.15 Basic Application Level Confidentiality Profile
    prep      -- fingerprint, plan, resampling, normalisation, label masks, patient split
    data      -- 2.5D patch sampling for training
    nets      -- the MONAI segmentation network
    infer     -- sliding-window inference over whole volumes
    detect    -- nodule masks from annotations; candidates, mask and detections from probabilities
    postprocess -- the post-processing chosen on the validation split (thresholds, shape weight)
    runtime   -- PyTorch or ONNX Runtime for whole-volume scoring, one case at a time
    metrics   -- voxel metrics and LUNA16 lesion-level FROC / CPM with bootstrap intervals
    onnxtools -- ONNX export, parity gate, ORT sessions, package checksums, Triton config
    quant     -- static INT8 quantization (QDQ), calibration, latency measurement
    predict   -- the exported model on a new DICOM study, without PyTorch
"""

__version__ = "0.1.0"
