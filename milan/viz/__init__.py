"""Pictures of runs and models: training curves (``milan plot``) and model visualisations (``milan visualize``)."""
