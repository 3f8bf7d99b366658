"""Real measured EIT data sets (file readers, device setups, challenge scores).

``ktc2023``: the Kuopio Tomography Challenge 2023 water tank (``dgm_eit.datasets.ktc2023``).
"""
