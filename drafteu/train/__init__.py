"""Training stages: the draft base, the draft ensembles, the OSD proxy."""
