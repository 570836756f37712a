"""The trainer worker: takes training jobs from JetStream and trains them with MMDetection."""
