"""De-identification to DICOM PS3.15 (Basic Application Level Confidentiality Profile and options).

table    -- the versioned action table (profile.csv, safe_private.csv, profile.json) and options
keys     -- the pseudonymisation key: where it comes from, keyed hashes of identifiers
engine   -- applying the table to one dataset (:class:`engine.Deidentifier`)
freetext -- the descriptors kept, and what is scrubbed out of them (in linear time)
names    -- the person names in a header (the cohort's names, scrubbed from every descriptor)
dates    -- dates shifted by the patient's keyed offset
write    -- writing the changed elements back without re-encoding the rest
files    -- one file in, one file out or a quarantine entry with its reason
verify   -- the leak gate: every source identifier looked for in every output byte
readback -- the leak gate's own reader of the written files
batch    -- many files at once in worker processes, and the leak scan over the output
cohort   -- the input folder, its annotations, the output folder and the tables beside it
stage    -- the anonymize stage's run: these strung together
"""
