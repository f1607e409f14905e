"""Deployment: the trained network as ONNX, INT8 and a verified package, and predicting with it.

    onnx_export -- the one dynamo export path (the opset OPSET, dynamic batch and H/W), run by train
    sessions    -- ONNX Runtime CPU sessions
    parity      -- real slabs and the parity gate between two predictors
    quant       -- static INT8 quantization (QDQ), calibration, latency
    int8        -- the quantize stage: calibration, sweep and choice, the test-split gate, latencies
    package     -- SHA256SUMS, Triton configuration, versions of the runtime stack
    spec        -- input_spec.json: how to feed the model and read its output
    card        -- the model card written into the package
    build       -- the export stage: the package built, verified and swapped into place
    runtime     -- PyTorch or ONNX Runtime for whole-volume scoring in evaluate and postprocess
    window      -- whole-volume inference with an ONNX Runtime session (slabs, windows, views)
    predict     -- a package on a new DICOM study, without PyTorch (``python -m ctpipe.predict``)

Nothing here is imported by this ``__init__``: ``predict`` must run where PyTorch is not installed.
"""
