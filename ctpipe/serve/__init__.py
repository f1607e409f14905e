"""The model next to the PACS: a DICOM node (C-STORE SCP, DICOMweb STOW-RS) that queues received
series on disk, runs the exported package on each, and sends the SEG and SR back.

``config`` (file + flags + secrets from the environment), ``spool`` (received instances and jobs
on disk, atomic, resumed after a restart), ``dimse`` (the C-STORE / C-ECHO SCP), ``web`` (STOW-RS,
health, jobs, Prometheus metrics), ``runner`` (series -> job -> predict -> send), ``send``
(C-STORE SCU, STOW-RS client), ``telemetry`` (metrics, PHI-free log names), ``logs`` (text or
JSON-lines log format). Entry point: ``python -m ctpipe.serve``.
"""
