"""Runnable experiments and the `qalign` command line; they only wire `ptq`, `qaft`, `compare`."""
