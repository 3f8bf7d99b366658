"""One module per CLI sub-command; see dgm_eit.cli."""
