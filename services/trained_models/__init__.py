"""TrainedModelService: the registry of trained models, their lineage and publication."""
