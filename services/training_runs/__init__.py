"""TrainingRunService: creates, queues, follows and cancels training runs."""
