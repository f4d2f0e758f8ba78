"""The floor every other package stands on: errors, typed config sections and the command-line
entry (``core/errors.py``, ``core/config.py``, ``core/cli.py``), and the on-disk checkpoint format
(``core/checkpoint.py``), written by training and read by decoding and export.

``packlora.core`` imports nothing else of packlora."""
