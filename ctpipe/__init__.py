"""ctpipe: a reproducible DVC pipeline for lung-nodule segmentation and detection on chest CT.

Foundations:
    config    -- params.yaml as one typed, validated object per section
    params    -- the command line all stages share
    fileio    -- atomic writes of JSON, CSV
    volumes   -- the compressed volumes of the preprocessed dataset
    runenv    -- package versions, CPU, device and git revision of a run
    progress  -- progress bars: live on a terminal, one line a minute in a log
    prefork   -- worker processes started before the heavy imports (no shared heap to copy)
    safepath  -- values from data never decide a path: UID grammar check, writes kept under a root
    geometry  -- world (LPS mm) <-> voxel index conversion, the only place it is done
Data:
    synth     -- the deterministic synthetic chest-CT cohort, written as DICOM with realistic PHI
    dicomio   -- scanning a folder of DICOM files, grouping series, checking and reading them
    deid/     -- de-identification to DICOM PS3.15
    prep      -- fingerprint, plan, resampling, body crop, patient split
    intensity -- the HU the preprocessed dataset keeps and the normalisation the network sees
    labels    -- annotated nodules painted into label masks
Model and results:
    model/          -- the 2.5D network, patch sampling, views, whole-volume inference
    postprocessing/ -- candidates and masks from probabilities; the choice made on validation
    evaluation/     -- voxel metrics and LUNA16 FROC / CPM
    deploy/         -- ONNX export, INT8, parity gates, the package, predict
Operation:
    serve/          -- the DICOM node next to the PACS: C-STORE SCP, STOW-RS, on-disk queue, metrics
    monitor/        -- PHI-free series records, drift tests against the training reference, reports
"""

__version__ = "0.1.0"
