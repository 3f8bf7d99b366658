"""The studies dgm-eit ships: importing this module registers each study's simulator with
:mod:`dgm_eit.simulators`, so a config of any of them finds its data pipeline.

It sits above the data layer (which knows no study) and is imported by the command line;
Python code that builds a study's data sets imports it too (or the study's own package).
A new study adds its package here and nothing below it.
"""

import dgm_eit.ktc  # noqa: F401  (the KTC2023 water tank: configs with [tank])
